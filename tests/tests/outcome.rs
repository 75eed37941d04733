//! Every error type answers its own outcome and remedy (`Classify`), every judged report its
//! own (`ReportOutcome`); a wrapper answers with what it wraps.

use gpu_passthrough::archive::ArchiveError;
use gpu_passthrough::archive::cpio::CpioError;
use gpu_passthrough::archive::erofs::ErofsError;
use gpu_passthrough::attach::{
    AttachError, CheckStatus, DoctorReport, HealthCheck, JournalError, Owner, OwnerError, Plan,
    ReconcileReport, Refusal, RefusalReason, Verification,
};
use gpu_passthrough::fetch::FetchError;
use gpu_passthrough::health::HealthError;
use gpu_passthrough::initrd::disk::UnknownForm;
use gpu_passthrough::initrd::listing::ListingError;
use gpu_passthrough::initrd::{DiskError, InitrdError};
use gpu_passthrough::inspect::{InspectError, Problem};
use gpu_passthrough::modinfo::ModinfoError;
use gpu_passthrough::outcome::{Classify, Outcome, ReportOutcome};
use gpu_passthrough::pci::ids::IdsError;
use gpu_passthrough::pci::{AddressError, PciAddress, PciError};
use gpu_passthrough::provision::ProvisionError;
use gpu_passthrough::registry::{Arch, ArtifactKind, DigestError, RegistryError, Sha256Digest};
use gpu_passthrough::remedy::Remedy;
use gpu_passthrough::tools::ToolError;
use gpu_passthrough::versions::{DiffError, Verdict, VersionsError};
use gpu_passthrough::vfio::VfioCheckError;
use gpu_passthrough::vgpu::VgpuError;

/// The proof that no error type is left out: this does not compile for a type without its
/// answer. (Within each type, the `match` in its impl does not compile while a variant is
/// unclassified.)
#[test]
fn every_error_type_of_the_library_is_classified() {
    fn classified<E: std::error::Error + Classify>() {}
    classified::<ArchiveError>();
    classified::<CpioError>();
    classified::<ErofsError>();
    classified::<AttachError>();
    classified::<gpu_passthrough::failpoint::FailpointError>();
    classified::<gpu_passthrough::driver_build::DriverBuildError>();
    classified::<gpu_passthrough::driver_build::headers::HeadersError>();
    classified::<gpu_passthrough::driver_build::sandbox::SandboxError>();
    classified::<gpu_passthrough::driver_build::signer::SignerError>();
    classified::<gpu_passthrough::driver_build::source::SourceError>();
    classified::<gpu_passthrough::driver_build::toolchain::ToolchainError>();
    classified::<gpu_passthrough::modsig::ModsigError>();
    classified::<gpu_passthrough::versions::build::BuildError>();
    classified::<JournalError>();
    classified::<OwnerError>();
    classified::<FetchError>();
    classified::<HealthError>();
    classified::<UnknownForm>();
    classified::<ListingError>();
    classified::<DiskError>();
    classified::<InitrdError>();
    classified::<gpu_passthrough::initrd::guest_init::Unfit>();
    classified::<InspectError>();
    classified::<Problem>();
    classified::<ModinfoError>();
    classified::<IdsError>();
    classified::<AddressError>();
    classified::<PciError>();
    classified::<ProvisionError>();
    classified::<DigestError>();
    classified::<RegistryError>();
    classified::<DiffError>();
    classified::<VersionsError>();
    classified::<VfioCheckError>();
    classified::<VgpuError>();
    classified::<ToolError>();
}

fn io() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::PermissionDenied)
}

fn unpinned() -> FetchError {
    FetchError::Unpinned {
        release: "r1".into(),
        kind: ArtifactKind::Kernel,
        arch: Arch::X86_64,
    }
}

fn mismatch() -> FetchError {
    FetchError::DigestMismatch {
        url: "file:///k".into(),
        expected: Sha256Digest([0; 32]),
        actual: Sha256Digest([1; 32]),
    }
}

fn journal_io() -> JournalError {
    JournalError::Io {
        action: "write",
        path: "journal.json".into(),
        source: io(),
    }
}

#[test]
fn a_refusal_stays_a_refusal_under_a_wrapper_and_a_failure_a_failure() {
    let refused = ProvisionError::Attach(AttachError::NothingRequested);
    assert_eq!(refused.outcome(), Outcome::Refused);
    assert_eq!(refused.remedy(), Some(Remedy::NameDevices));
    let corrupt = JournalError::Corrupt {
        path: "journal.json".into(),
        source: serde_json::from_str::<serde_json::Value>("{").unwrap_err(),
    };
    let err = ProvisionError::Attach(AttachError::Journal(corrupt));
    assert_eq!(err.outcome(), Outcome::Failed);
    assert_eq!(err.remedy(), None);
}

#[test]
fn a_provisioning_failure_is_classified_by_what_is_inside() {
    let layers = |source| ProvisionError::Layers {
        release: "r".into(),
        source,
    };
    let failed = layers(InitrdError::Io {
        context: "writing".into(),
        source: io(),
    });
    assert_eq!(failed.outcome(), Outcome::Failed);
    let refused = layers(InitrdError::Fetch(unpinned()));
    assert_eq!(refused.outcome(), Outcome::Refused);
    assert_eq!(refused.remedy(), Some(Remedy::PinRelease("r1".into())));
    let tampered = layers(InitrdError::Fetch(mismatch()));
    assert_eq!(tampered.outcome(), Outcome::VerificationFailed);
    let no_init = layers(InitrdError::NoGuestInit {
        looked_in: "/usr/libexec".into(),
    });
    assert_eq!(no_init.remedy(), Some(Remedy::GuestInit));
}

#[test]
fn a_bad_address_or_owner_is_refused() {
    let bad = "zz:zz".parse::<PciAddress>().unwrap_err();
    assert_eq!(bad.outcome(), Outcome::Refused);
    assert_eq!(Owner::new("../x").unwrap_err().outcome(), Outcome::Refused);
}

#[test]
fn the_remedy_is_found_below_a_wrapper() {
    let pci = PciError::Read {
        path: "/x".into(),
        source: io(),
    };
    assert_eq!(AttachError::Pci(pci).remedy(), Some(Remedy::SysfsRoot));
    assert_eq!(
        InitrdError::Fetch(unpinned()).remedy(),
        Some(Remedy::PinRelease("r1".into()))
    );
    let cache = FetchError::Cache {
        path: "/cache".into(),
        source: io(),
    };
    let fetch = VersionsError::Fetch {
        what: "kernel".into(),
        source: cache,
    };
    assert_eq!(fetch.remedy(), Some(Remedy::CacheDir));
    let health_io = HealthError::Io {
        action: "writing",
        path: "/state/health.json".into(),
        source: io(),
    };
    assert_eq!(
        AttachError::Health(health_io).remedy(),
        Some(Remedy::StateDir)
    );
    let read = RegistryError::Read {
        file: "r.toml".into(),
        source: io(),
    };
    assert_eq!(
        VersionsError::Registry(read).remedy(),
        Some(Remedy::RegistryFile)
    );
    assert_eq!(
        AttachError::NotAttached(Owner::new("a").unwrap()).remedy(),
        None
    );
}

#[test]
fn the_upgrade_workflow_tells_tampering_from_refusal_from_failure() {
    let fetch = |source| VersionsError::Fetch {
        what: "kernel".into(),
        source,
    };
    assert_eq!(fetch(mismatch()).outcome(), Outcome::VerificationFailed);
    let cap = FetchError::UnpinnedCap {
        url: "u".into(),
        cap: 1,
        seen: 2,
    };
    assert_eq!(fetch(cap).outcome(), Outcome::VerificationFailed);
    assert_eq!(fetch(unpinned()).outcome(), Outcome::Refused);
    assert_eq!(fetch(FetchError::NoUrls).outcome(), Outcome::Failed);
    let rejected = InspectError::Rejected {
        problems: vec![Problem::OpenWithoutGsp],
    };
    assert_eq!(
        VersionsError::Refused(rejected).outcome(),
        Outcome::VerificationFailed
    );
    let diff = DiffError::Inspect {
        release: "r".into(),
        source: InitrdError::Fetch(mismatch()),
    };
    assert_eq!(diff.outcome(), Outcome::VerificationFailed);
}

#[test]
fn a_vgpu_request_that_does_not_fit_is_refused_and_a_read_failure_failed() {
    let zero = VgpuError::ZeroCount {
        profile: "L40S-4Q".into(),
    };
    assert_eq!(AttachError::Vgpu(zero).outcome(), Outcome::Refused);
    let read = VgpuError::Read {
        path: "/sys/x".into(),
        source: io(),
    };
    assert_eq!(AttachError::Vgpu(read).outcome(), Outcome::Failed);
}

#[test]
fn a_disk_whose_mount_modules_are_missing_failed_verification() {
    let missing = DiskError::MountModuleMissing {
        release: "r".into(),
        module: "erofs".into(),
        needed_by: None,
    };
    assert_eq!(
        InitrdError::Disk(missing).outcome(),
        Outcome::VerificationFailed
    );
    let mkfs = DiskError::Mkfs(ToolError::Missing {
        tool: gpu_passthrough::initrd::disk::MKFS_EROFS,
        dirs: Vec::new(),
    });
    assert_eq!(InitrdError::Disk(mkfs).outcome(), Outcome::Failed);
    let planted = DiskError::Mkfs(ToolError::Untrusted {
        tool: gpu_passthrough::initrd::disk::MKFS_EROFS,
        path: "/usr/local/sbin".into(),
        why: "it is owned by uid 1000".into(),
    });
    assert_eq!(InitrdError::Disk(planted).outcome(), Outcome::Refused);
}

#[test]
fn a_plan_with_a_boot_display_refusal_is_refused_and_names_the_remedy() {
    let mut plan = Plan {
        requested: Vec::new(),
        devices: Vec::new(),
        mdevs: Vec::new(),
        iommu_groups: Vec::new(),
        refusals: Vec::new(),
        writes: Vec::new(),
        mmio: None,
        host_phys_bits: None,
        placement: Vec::new(),
        partition: None,
    };
    assert_eq!((plan.outcome(), plan.remedy()), (None, None));
    let refusal = Refusal {
        device: Some("0000:00:02.0".parse().unwrap()),
        reason: RefusalReason::BootVga,
        message: "boot display".into(),
        owner: None,
    };
    plan.refusals.push(refusal.clone());
    assert_eq!(plan.outcome(), Some(Outcome::Refused));
    assert_eq!(plan.remedy(), Some(Remedy::AllowBootVga));
    // The same refusal raised as an error names the same remedy.
    let err = AttachError::Refused(vec![refusal]);
    assert_eq!(
        (err.outcome(), err.remedy()),
        (Outcome::Refused, Some(Remedy::AllowBootVga))
    );
}

#[test]
fn a_reconcile_fails_on_errors_and_asks_for_owners_it_could_not_judge() {
    let mut report = ReconcileReport::default();
    assert_eq!((report.outcome(), report.remedy()), (None, None));
    report.kept_unknown.push(Owner::new("vm-1").unwrap());
    assert_eq!(report.outcome(), None, "keeping an owner is no failure");
    assert_eq!(report.remedy(), Some(Remedy::DeclareGone));
    report.errors.push("rollback of 0000:01:00.0 failed".into());
    assert_eq!(report.outcome(), Some(Outcome::Failed));
}

#[test]
fn a_failed_doctor_check_is_not_ready_and_a_warning_is_fine() {
    let report = |verdict| DoctorReport {
        checks: Vec::new(),
        verdict,
    };
    assert_eq!(report(CheckStatus::Warn).outcome(), None);
    assert_eq!(report(CheckStatus::Fail).outcome(), Some(Outcome::NotReady));
}

#[test]
fn a_reset_whose_device_does_not_verify_failed_verification() {
    let mut check = HealthCheck {
        reset: None,
        verify: Verification {
            device: "0000:01:00.0".parse().unwrap(),
            ok: true,
            vendor_id: Some(0x10de),
            device_id: Some(0x2684),
            driver: Some("nvidia".into()),
            problems: Vec::new(),
            ms: 1,
            bar0: None,
            link_width: None,
            aer: None,
        },
        events: Vec::new(),
    };
    assert_eq!(check.outcome(), None);
    check.verify.ok = false;
    assert_eq!(check.outcome(), Some(Outcome::VerificationFailed));
}

#[test]
fn each_verify_verdict_has_its_own_outcome() {
    assert_eq!(Verdict::Ok.outcome(), None);
    let bad = vec!["r x86_64 kernel (mismatch)".to_owned()];
    assert_eq!(
        Verdict::Mismatch(bad.clone()).outcome(),
        Some(Outcome::VerificationFailed)
    );
    assert_eq!(Verdict::Error(bad).outcome(), Some(Outcome::Failed));
    assert_eq!(Verdict::Unpinned(2).outcome(), Some(Outcome::Refused));
}

#[test]
fn failures_on_the_way_are_failed_whatever_module_raised_them() {
    let failed: Vec<Box<dyn Classify>> = vec![
        Box::new(VfioCheckError::Container {
            path: "/dev/vfio/vfio".into(),
            source: io(),
        }),
        Box::new(VfioCheckError::NotViable { group: 3 }),
        Box::new(ModinfoError::NoModinfo {
            file: "nvidia.ko".into(),
        }),
        Box::new(ListingError::Io {
            file: "initrd".into(),
            source: io(),
        }),
        Box::new(ArchiveError::Malformed {
            archive: "a.tar".into(),
            entry: None,
            source: io(),
        }),
        Box::new(IdsError::Read {
            path: "supported-gpus.json".into(),
            source: io(),
        }),
        Box::new(RegistryError::NoDefault { known: Vec::new() }),
        Box::new(DigestError::Length(3)),
        Box::new(HealthError::NoHistory(Owner::new("vm").unwrap())),
        Box::new(ProvisionError::UnsupportedArch("sparc")),
        Box::new(FetchError::Http {
            url: "https://x/k".into(),
            status: 503,
        }),
    ];
    for err in failed {
        assert_eq!(err.outcome(), Outcome::Failed);
    }
}

#[test]
fn a_state_dir_that_cannot_be_written_names_the_state_dir_wherever_it_surfaces() {
    let health_io = || HealthError::Io {
        action: "write",
        path: "health.json".into(),
        source: io(),
    };
    for remedy in [
        journal_io().remedy(),
        AttachError::Journal(journal_io()).remedy(),
        health_io().remedy(),
        AttachError::Health(health_io()).remedy(),
        ProvisionError::Attach(AttachError::Health(health_io())).remedy(),
    ] {
        assert_eq!(remedy, Some(Remedy::StateDir));
    }
}
