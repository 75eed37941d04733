//! Host-side commands: doctor, devices, plan, attach, detach, reconcile. To be written.
use std::process::ExitCode;

use crate::Global;

macro_rules! stub {
    ($($args:ident => $f:ident),*) => {$(
        /// Arguments (to be written).
        #[derive(Debug, clap::Args)]
        pub struct $args {}
        /// Run the command (to be written).
        pub fn $f(_global: &Global, _args: &$args) -> anyhow::Result<ExitCode> {
            anyhow::bail!("not implemented yet")
        }
    )*};
}
stub!(DoctorArgs => doctor, DevicesArgs => devices, PlanArgs => plan, AttachArgs => attach,
      DetachArgs => detach, ReconcileArgs => reconcile);
