//! The problems inspection finds, each naming the file and the fix, and the error that carries
//! them.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::outcome::{Classify, Outcome};
use crate::registry::{Arch, ModuleFlavor};

/// One thing wrong with the artifacts; each names the file and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A module's vermagic names another kernel.
    #[error(
        "{file}: built for kernel {built_for}, release says {expected}: rebuild the modules for {expected} or fix kernel_version"
    )]
    WrongKernel {
        /// The module.
        file: PathBuf,
        /// The vermagic's first word.
        built_for: String,
        /// The release's kernel version.
        expected: String,
    },
    /// A module has no vermagic at all.
    #[error(
        "{file}: no vermagic in .modinfo, the kernel will refuse it: rebuild the module with the kernel's build system"
    )]
    NoVermagic {
        /// The module.
        file: PathBuf,
    },
    /// An NVIDIA module's version is not the driver version.
    #[error(
        "{file}: module version is {found}, release says driver {expected}: use the modules of driver {expected} or fix driver_version"
    )]
    WrongDriverVersion {
        /// The module.
        file: PathBuf,
        /// Its `version=` (or `none`).
        found: String,
        /// The release's driver version.
        expected: String,
    },
    /// An ELF file is built for another architecture.
    #[error(
        "{file}: built for ELF machine {machine}, release arch {arch} needs {expected}: use the {arch} build of this artifact"
    )]
    WrongArch {
        /// The file.
        file: PathBuf,
        /// Its `e_machine`.
        machine: u16,
        /// The expected architecture.
        arch: Arch,
        /// The expected `e_machine`.
        expected: u16,
    },
    /// A dependency resolves nowhere.
    #[error(
        "{file}: module {module} depends on {dependency}, which is not in the NVIDIA modules, the kernel-modules artifact or its modules.builtin: add {dependency}.ko to the kernel-modules artifact"
    )]
    UnresolvedDependency {
        /// The module that needs it.
        file: PathBuf,
        /// That module's name.
        module: String,
        /// The missing dependency (as written in `depends=`).
        dependency: String,
    },
    /// Modules depend on each other in a circle.
    #[error("modules {modules} depend on each other in a cycle and cannot be loaded: rebuild them")]
    DependencyCycle {
        /// The modules involved, comma-separated.
        modules: String,
    },
    /// A `firmware=` file is nowhere to be found.
    #[error(
        "{file}: needs firmware {firmware}, which is in neither the nvidia-firmware artifact nor the kernel-modules artifact's lib/firmware: add the firmware artifact of this driver version"
    )]
    MissingFirmware {
        /// The module that needs it.
        file: PathBuf,
        /// The firmware path relative to `/lib/firmware`.
        firmware: String,
    },
    /// A module's license says the other flavor.
    #[error(
        "{file}: module {module} has license `{license}`, which is the {actual} build, but the release says {claimed}: set the release's module flavor to {actual} or use the {claimed} modules"
    )]
    WrongFlavor {
        /// The module.
        file: PathBuf,
        /// Its name.
        module: String,
        /// Its `license=` (or `none`).
        license: String,
        /// The flavor the license means.
        actual: ModuleFlavor,
        /// The flavor the release claims.
        claimed: ModuleFlavor,
    },
    /// Open modules need GSP firmware; a release without it cannot use them.
    #[error(
        "the open modules need GSP firmware, but the release ships none (gsp = false): add the nvidia-firmware artifact, or use the proprietary modules"
    )]
    OpenWithoutGsp,
    /// A real library's name does not carry the driver version.
    #[error(
        "{file}: library {real_name} does not carry driver version {expected} (expected a name ending in .so.{expected}): use the libraries of driver {expected}"
    )]
    LibraryVersion {
        /// The library.
        file: PathBuf,
        /// Its file name.
        real_name: String,
        /// The release's driver version.
        expected: String,
    },
    /// Two module files claim the same name.
    #[error(
        "module {name} appears twice, in {first} and {second}: keep one of them in the artifacts"
    )]
    DuplicateModule {
        /// The module name.
        name: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },
    /// Two libraries share a file name or a soname.
    #[error(
        "library name {name} appears twice, in {first} and {second}: keep one of them in the nvidia-driver-libs artifact"
    )]
    DuplicateLibrary {
        /// The shared file name or soname.
        name: String,
        /// The first library.
        first: PathBuf,
        /// The second library.
        second: PathBuf,
    },
    /// A library's `DT_SONAME` is not a plain file name.
    #[error(
        "{file}: soname `{soname}` is not a plain file name (it would be created outside the library directory): use the vendor's unmodified library"
    )]
    BadSoname {
        /// The library.
        file: PathBuf,
        /// Its soname as stored.
        soname: String,
    },
    /// The NVIDIA modules tree holds no module.
    #[error(
        "{tree}: no kernel modules (.ko) found in the nvidia-modules artifact: check the artifact URL and its layout (lib/modules/<kver>/kernel/drivers/gpu/)"
    )]
    NoNvidiaModules {
        /// The tree's root.
        tree: PathBuf,
    },
    /// An NVIDIA module of a release that names a signer carries no signature.
    #[error(
        "{file}: module {module} carries no signature, but the release says its modules are signed by \"{subject}\" (key {key_id}): sign it with that key (the kernel's scripts/sign-file, or versions build --sign-key/--sign-cert) or use the artifact that was signed"
    )]
    UnsignedModule {
        /// The module.
        file: PathBuf,
        /// Its name.
        module: String,
        /// The release's signer.
        subject: String,
        /// The release's key id.
        key_id: String,
    },
    /// An NVIDIA module is signed by another key than the release names.
    #[error(
        "{file}: module {module} is signed by \"{found_subject}\" (key {found_key_id}), but the release says \"{subject}\" (key {key_id}): use the modules signed by the release's key, or record the signer that signed them"
    )]
    WrongSigner {
        /// The module.
        file: PathBuf,
        /// Its name.
        module: String,
        /// The signer the signature names (`modinfo`'s `signer:`).
        found_subject: String,
        /// Its key id (`modinfo`'s `sig_key:`).
        found_key_id: String,
        /// The release's signer.
        subject: String,
        /// The release's key id.
        key_id: String,
    },
    /// The guest kernel refuses unsigned modules and this one has none.
    #[error(
        "{file}: module {module} carries no signature, and the guest kernel refuses unsigned modules (module_sig_force = true, CONFIG_MODULE_SIG_FORCE=y): use the kernel's signed modules, or sign it with a key the kernel trusts"
    )]
    UnsignedUnderForce {
        /// The module.
        file: PathBuf,
        /// Its name.
        module: String,
    },
    /// The guest kernel refuses unsigned modules but the release names no signer.
    #[error(
        "the guest kernel refuses unsigned modules (module_sig_force = true, CONFIG_MODULE_SIG_FORCE=y) but the release names no signer: build the modules with versions build --sign-key/--sign-cert and a key the guest kernel trusts"
    )]
    ForcedSignaturesWithoutSigner,
    /// A file could not be read or parsed.
    #[error("{file}: {reason}")]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// What went wrong, with the fix.
        reason: String,
    },
}

/// Every problem is the artifacts failing a check against the release.
impl Classify for Problem {
    fn outcome(&self) -> Outcome {
        match self {
            Problem::WrongKernel { .. }
            | Problem::NoVermagic { .. }
            | Problem::WrongDriverVersion { .. }
            | Problem::WrongArch { .. }
            | Problem::UnresolvedDependency { .. }
            | Problem::DependencyCycle { .. }
            | Problem::MissingFirmware { .. }
            | Problem::WrongFlavor { .. }
            | Problem::OpenWithoutGsp
            | Problem::LibraryVersion { .. }
            | Problem::DuplicateModule { .. }
            | Problem::DuplicateLibrary { .. }
            | Problem::BadSoname { .. }
            | Problem::NoNvidiaModules { .. }
            | Problem::UnsignedModule { .. }
            | Problem::WrongSigner { .. }
            | Problem::UnsignedUnderForce { .. }
            | Problem::ForcedSignaturesWithoutSigner
            | Problem::Unreadable { .. } => Outcome::VerificationFailed,
        }
    }
}

/// The artifacts failed inspection; `problems` lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// One or more checks failed.
    #[error("the artifacts failed {} check(s):\n{}", problems.len(), ProblemList(problems))]
    Rejected {
        /// Every problem found, in a stable order.
        problems: Vec<Problem>,
    },
}

impl Classify for InspectError {
    fn outcome(&self) -> Outcome {
        match self {
            InspectError::Rejected { .. } => Outcome::VerificationFailed,
        }
    }
}

impl InspectError {
    /// Every problem found.
    pub fn problems(&self) -> &[Problem] {
        match self {
            InspectError::Rejected { problems } => problems,
        }
    }

    /// The same problems with the paths below `root` made relative to it: for trees unpacked
    /// into a scratch directory that is gone once the error is returned.
    pub fn relative_to(self, root: &Path) -> InspectError {
        match self {
            InspectError::Rejected { problems } => InspectError::Rejected {
                problems: problems.into_iter().map(|p| p.relative_to(root)).collect(),
            },
        }
    }
}

impl Problem {
    /// The same problem with its paths below `root` made relative to it.
    fn relative_to(self, root: &Path) -> Problem {
        let rel = |p: PathBuf| p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p);
        match self {
            Problem::WrongKernel {
                file,
                built_for,
                expected,
            } => Problem::WrongKernel {
                file: rel(file),
                built_for,
                expected,
            },
            Problem::NoVermagic { file } => Problem::NoVermagic { file: rel(file) },
            Problem::WrongDriverVersion {
                file,
                found,
                expected,
            } => Problem::WrongDriverVersion {
                file: rel(file),
                found,
                expected,
            },
            Problem::WrongArch {
                file,
                machine,
                arch,
                expected,
            } => Problem::WrongArch {
                file: rel(file),
                machine,
                arch,
                expected,
            },
            Problem::UnresolvedDependency {
                file,
                module,
                dependency,
            } => Problem::UnresolvedDependency {
                file: rel(file),
                module,
                dependency,
            },
            Problem::MissingFirmware { file, firmware } => Problem::MissingFirmware {
                file: rel(file),
                firmware,
            },
            Problem::WrongFlavor {
                file,
                module,
                license,
                actual,
                claimed,
            } => Problem::WrongFlavor {
                file: rel(file),
                module,
                license,
                actual,
                claimed,
            },
            Problem::LibraryVersion {
                file,
                real_name,
                expected,
            } => Problem::LibraryVersion {
                file: rel(file),
                real_name,
                expected,
            },
            Problem::DuplicateModule {
                name,
                first,
                second,
            } => Problem::DuplicateModule {
                name,
                first: rel(first),
                second: rel(second),
            },
            Problem::DuplicateLibrary {
                name,
                first,
                second,
            } => Problem::DuplicateLibrary {
                name,
                first: rel(first),
                second: rel(second),
            },
            Problem::BadSoname { file, soname } => Problem::BadSoname {
                file: rel(file),
                soname,
            },
            Problem::NoNvidiaModules { tree } => Problem::NoNvidiaModules { tree: rel(tree) },
            // The reason is the reader's message, which may name the file again.
            Problem::Unreadable { file, reason } => Problem::Unreadable {
                file: rel(file),
                reason: reason.replace(&format!("{}/", root.display()), ""),
            },
            Problem::UnsignedModule {
                file,
                module,
                subject,
                key_id,
            } => Problem::UnsignedModule {
                file: rel(file),
                module,
                subject,
                key_id,
            },
            Problem::WrongSigner {
                file,
                module,
                found_subject,
                found_key_id,
                subject,
                key_id,
            } => Problem::WrongSigner {
                file: rel(file),
                module,
                found_subject,
                found_key_id,
                subject,
                key_id,
            },
            Problem::UnsignedUnderForce { file, module } => Problem::UnsignedUnderForce {
                file: rel(file),
                module,
            },
            Problem::DependencyCycle { .. }
            | Problem::OpenWithoutGsp
            | Problem::ForcedSignaturesWithoutSigner => self,
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}
