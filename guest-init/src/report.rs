//! How the guest init judges its own work. The report's types are the guest contract and live in
//! [`gpu_passthrough_guest_contract::report`]; this module holds the policy that fills them.

use gpu_passthrough_guest_contract::report::{ModuleResult, Report, Status};

/// Derive `status` from the modules, error and problems: `failed` when the setup could not start
/// or any module failed or was skipped, `degraded` when the driver is up but a problem was found.
pub fn finish_status(report: &mut Report) {
    let module_failed = report
        .modules
        .iter()
        .any(|m| matches!(m.result, ModuleResult::Failed | ModuleResult::Skipped));
    report.status = if report.error.is_some() || module_failed {
        Status::Failed
    } else if !report.problems.is_empty() {
        Status::Degraded
    } else {
        Status::Ok
    };
}
