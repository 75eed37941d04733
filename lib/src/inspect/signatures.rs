//! Module signatures against what the release says: every NVIDIA module of a release that names
//! a signer carries a signature by it (signer name and key id as `modinfo` shows them), and for
//! a guest kernel that refuses unsigned modules (`module_sig_force`) every module carries one and
//! the release names its signer.

use std::path::Path;

use crate::modsig;
use crate::registry::{Release, Signer};

use super::{InspectedModule, Problem};

/// What a release says of its modules' signatures.
#[derive(Debug, Clone, Copy, Default)]
pub struct SigningRule<'a> {
    /// Who signed the NVIDIA modules (the release's `signer`); `None`: nobody need have.
    pub signer: Option<&'a Signer>,
    /// The guest kernel refuses unsigned modules (the release's `module_sig_force`).
    pub module_sig_force: bool,
}

impl<'a> SigningRule<'a> {
    /// The rule `release` records (`signer`, `module_sig_force`).
    pub fn of(release: &'a Release) -> Self {
        SigningRule {
            signer: release.signer.as_ref(),
            module_sig_force: release.module_sig_force,
        }
    }
}

/// The release-wide rule: a kernel that refuses unsigned modules needs a signed release.
pub(super) fn check_release(rule: SigningRule, problems: &mut Vec<Problem>) {
    if rule.module_sig_force && rule.signer.is_none() {
        problems.push(Problem::ForcedSignaturesWithoutSigner);
    }
}

/// One module's signature against the release: NVIDIA modules against its signer, every module
/// (the kernel's own too) present at all under `module_sig_force`. Reads the module's tail only
/// (a compressed module whole), and nothing at all when the release asks for no signature.
pub(super) fn check_module(
    rule: SigningRule,
    module: &InspectedModule,
    problems: &mut Vec<Problem>,
) {
    let signer = rule.signer.filter(|_| module.nvidia);
    if signer.is_none() && !rule.module_sig_force {
        return;
    }
    let file = module.source.clone();
    let found = match modsig::from_path(&module.source) {
        Ok(found) => found,
        Err(e) => {
            problems.push(Problem::Unreadable {
                file,
                reason: crate::error_chain(&e),
            });
            return;
        }
    };
    match (found, signer) {
        (None, Some(want)) => problems.push(Problem::UnsignedModule {
            file,
            module: module.name.clone(),
            subject: want.subject.clone(),
            key_id: want.key_id.clone(),
        }),
        (None, None) => problems.push(Problem::UnsignedUnderForce {
            file,
            module: module.name.clone(),
        }),
        (Some(sig), Some(want)) if !signed_by(&sig, want) => problems.push(Problem::WrongSigner {
            file,
            module: module.name.clone(),
            found_key_id: sig.key_id_hex(),
            found_subject: sig.signer.unwrap_or_else(|| "(no name)".into()),
            subject: want.subject.clone(),
            key_id: want.key_id.clone(),
        }),
        (Some(_), _) => {}
    }
}

/// The signature names `want`: the same signer name and key id (compared as `modinfo` prints
/// them, hex case aside).
fn signed_by(sig: &modsig::ModuleSignature, want: &Signer) -> bool {
    sig.signer.as_deref() == Some(want.subject.as_str())
        && sig.key_id_hex().eq_ignore_ascii_case(want.key_id.trim())
}

/// Every module under `root` (an unpacked `nvidia-modules` artifact) against `rule`, as
/// [`super::inspect`] checks them: for `verify --deep`, which re-checks a cached tree without
/// the release's other artifacts. Empty when all is well.
pub fn check_tree(rule: SigningRule, root: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_release(rule, &mut problems);
    for file in super::module_files(root, &mut problems) {
        let module = InspectedModule {
            name: super::module_stem(&file).unwrap_or_default(),
            source: file.clone(),
            info: crate::modinfo::ModInfo::from_section(b"", 0),
            nvidia: true,
        };
        check_module(rule, &module, &mut problems);
    }
    problems
}
