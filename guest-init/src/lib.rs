//! The guest init of gpu-passthrough.
//!
//! As PID 1 ([`boot::pid1`]) it mounts the basics, runs the GPU setup when `HAS_GPU=1`, switches
//! into the workload root and runs the workload. As `gpu-init setup --root DIR` another init calls
//! only the GPU setup ([`setup::run`]). Every path the setup touches comes from a
//! [`context::SetupContext`] and module loading goes through [`modules::ModuleLoader`], so tests run
//! it against fake `/proc` trees and temporary roots.
#![deny(missing_docs)]

pub mod boot;
pub mod cdi;
pub mod cdi_hook;
pub mod context;
pub mod daemons;
pub mod disk;
pub mod dm;
pub mod dryrun;
pub mod env;
pub mod inroot;
pub mod kmsg;
pub mod libraries;
pub mod loaded;
pub mod modules;
pub mod nodes;
pub mod report;
pub mod setup;
pub mod sys;
pub mod xid_watch;
