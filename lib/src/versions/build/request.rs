//! What to build, from which inputs, and the checks made before anything is fetched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::BuildError;
use crate::driver_build::SigningKey;
use crate::driver_build::sandbox::SandboxLimits;
use crate::registry::{Arch, ArtifactKind, ModuleFlavor, Registry};
use crate::versions::AddRequest;

/// The inputs of a build, by URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildInputs {
    /// The module source (mirrors in order).
    pub source: Vec<String>,
    /// The kernel-headers archives, one URL each.
    pub headers: Vec<String>,
    /// Patches, in the order they are applied.
    pub patches: Vec<String>,
    /// The release's other artifacts (kernel, firmware, libraries...), inspected with the
    /// modules and pinned like `versions add` does.
    pub others: BTreeMap<ArtifactKind, Vec<String>>,
}

impl BuildInputs {
    /// `KIND=URL` pairs: `nvidia-kernel-source` once (again: a mirror), `kernel-headers` and
    /// `source-patch` once per archive or patch, in order; other kinds as `versions add` takes
    /// them. `nvidia-modules` is what the build makes and is refused.
    pub fn parse<S: AsRef<str>>(pairs: &[S]) -> Result<BuildInputs, String> {
        let mut inputs = BuildInputs::default();
        for pair in pairs {
            let pair = pair.as_ref();
            let (kind, url) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "`{pair}`: expected KIND=URL, e.g. kernel-headers=https://example.com/h.deb"
                )
            })?;
            let kind: ArtifactKind = kind.parse().map_err(|e: String| format!("`{pair}`: {e}"))?;
            let url = url.to_string();
            match kind {
                ArtifactKind::NvidiaKernelSource => inputs.source.push(url),
                ArtifactKind::KernelHeaders => inputs.headers.push(url),
                ArtifactKind::SourcePatch => inputs.patches.push(url),
                ArtifactKind::NvidiaModules => {
                    return Err(format!(
                        "`{pair}`: nvidia-modules is what `versions build` makes; use `versions \
                         add` to add built modules"
                    ));
                }
                other => inputs.others.entry(other).or_default().push(url),
            }
        }
        if inputs.source.is_empty() {
            return Err("an nvidia-kernel-source=URL artifact is required".into());
        }
        if inputs.headers.is_empty() {
            return Err("at least one kernel-headers=URL artifact is required".into());
        }
        Ok(inputs)
    }
}

/// A release to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The registry file to write (created if missing).
    pub file: PathBuf,
    /// Name of the new release.
    pub release: String,
    /// The guest kernel's `uname -r`.
    pub kernel_version: String,
    /// The NVIDIA driver version the source must be.
    pub driver_version: String,
    /// The module flavor the source must be.
    pub flavor: ModuleFlavor,
    /// The architecture (this machine's: no cross-compiling).
    pub arch: Arch,
    /// What to build from.
    pub inputs: BuildInputs,
    /// Sign every module with this key.
    pub signing: Option<SigningKey>,
    /// Where the artifact will be published: its URL is this + its file name.
    pub base_url: Option<String>,
    /// A directory to copy the artifact into, for publishing.
    pub out_dir: Option<PathBuf>,
    /// Make it the default release.
    pub default: bool,
    /// Overwrite a release of the same name in the file.
    pub replace: bool,
    /// Whether the release ships GSP firmware (`false`: proprietary only).
    pub gsp: bool,
    /// Largest download accepted per input; `None`: the fetcher's default cap.
    pub max_download_bytes: Option<u64>,
    /// The sandbox's limits.
    pub limits: SandboxLimits,
    /// `make -j`; `None`: the cores available.
    pub jobs: Option<usize>,
}

impl BuildRequest {
    /// The build of the release `add` describes, from `inputs` (they are its artifacts), with
    /// the driver version and flavor the source must be; no key, base URL or output directory,
    /// the sandbox's default limits, every core. `add`'s `signer` and `module_sig_force` are
    /// refused ([`BuildError::SignerGiven`]): a build records them from its key's certificate and
    /// the kernel's `.config`.
    pub fn from_add(
        add: AddRequest,
        driver_version: String,
        flavor: ModuleFlavor,
        inputs: BuildInputs,
    ) -> Result<BuildRequest, BuildError> {
        if add.signer.is_some() || add.module_sig_force {
            return Err(BuildError::SignerGiven);
        }
        Ok(BuildRequest {
            file: add.file,
            release: add.release,
            kernel_version: add.kernel_version,
            driver_version,
            flavor,
            arch: add.arch,
            inputs,
            signing: None,
            base_url: None,
            out_dir: None,
            default: add.default,
            replace: add.replace,
            gsp: add.gsp,
            max_download_bytes: add.max_download_bytes,
            limits: SandboxLimits::default(),
            jobs: None,
        })
    }
}

/// Refuse what cannot be built here before anything is fetched.
pub(super) fn check_request(req: &BuildRequest) -> Result<(), BuildError> {
    for (field, value) in [
        ("kernel version", &req.kernel_version),
        ("driver version", &req.driver_version),
    ] {
        if let Some(problem) = crate::registry::version_string_problem(value) {
            return Err(BuildError::BadVersion { field, problem });
        }
    }
    if Arch::host() != Some(req.arch) {
        return Err(BuildError::OtherArch { arch: req.arch });
    }
    let schemes = ["https://", "http://", "file://"];
    if let Some(base) = req
        .base_url
        .as_ref()
        .filter(|b| !schemes.iter().any(|s| b.starts_with(s)))
    {
        return Err(BuildError::BadBaseUrl(base.clone()));
    }
    if !req.replace {
        Registry::refuse_existing(&req.file, &req.release)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Classify, Outcome};
    use crate::registry::Signer;

    /// A caller's signer is refused, not dropped: the build names its own from the certificate.
    #[test]
    fn a_signer_or_forced_signatures_from_the_caller_are_refused() {
        let add = |signer: Option<Signer>, module_sig_force| AddRequest {
            file: "r.toml".into(),
            release: "r".into(),
            kernel_version: "6.1.0-56-amd64".into(),
            driver_version: Some("535.261.03".into()),
            flavor: Some(ModuleFlavor::Open),
            gsp: true,
            arch: Arch::X86_64,
            artifacts: BTreeMap::new(),
            default: false,
            replace: false,
            max_download_bytes: None,
            signer,
            module_sig_force,
        };
        let build = |add| {
            BuildRequest::from_add(
                add,
                "535.261.03".into(),
                ModuleFlavor::Open,
                Default::default(),
            )
        };
        assert!(build(add(None, false)).is_ok());
        let signer = Signer {
            subject: "k".into(),
            key_id: "01".into(),
        };
        for err in [build(add(Some(signer), false)), build(add(None, true))]
            .into_iter()
            .map(Result::unwrap_err)
        {
            assert!(matches!(err, BuildError::SignerGiven), "{err}");
            assert_eq!(err.outcome(), Outcome::Refused);
            assert!(err.to_string().contains("--sign-key"), "{err}");
        }
    }
}
