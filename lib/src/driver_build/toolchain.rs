//! The host programs a build needs, found where the sandbox finds them, and the compiler the
//! kernel was built with.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::outcome::{Classify, Outcome};
use crate::tools::{PROBE_LIMIT, RunError, run_bounded};

/// The sandbox's `PATH`: the host's system directories, nothing from the caller's environment.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

pub use crate::tools::Tool;

/// The sandbox, run as root on the host: found only at a checked system path.
pub const BWRAP: Tool = Tool {
    program: "bwrap",
    package: "bubblewrap",
};

/// What every build runs: the sandbox, its memory limit, make, strip.
pub const BUILD_TOOLS: [Tool; 4] = [
    BWRAP,
    Tool {
        program: "prlimit",
        package: "util-linux",
    },
    Tool {
        program: "make",
        package: "make",
    },
    Tool {
        program: "strip",
        package: "binutils",
    },
];

/// What applying source patches runs.
pub const PATCH_TOOL: Tool = Tool {
    program: "patch",
    package: "patch",
};

/// What reading a signing certificate runs.
pub const OPENSSL_TOOL: Tool = Tool {
    program: "openssl",
    package: "openssl",
};

/// Why the toolchain cannot build for this kernel.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    /// A program is not installed.
    #[error("`{program}` is not installed; install the Debian package `{package}`")]
    Missing {
        /// The program.
        program: String,
        /// Its Debian package.
        package: String,
    },
    /// The kernel was built with another compiler major version than the one installed.
    #[error(
        "the kernel was built with `{kernel}` (CONFIG_CC_VERSION_TEXT) but this machine's \
         `{program}` is `{found}`: modules must be built with the kernel's compiler major \
         version; install the Debian package `{package}`"
    )]
    Mismatch {
        /// The kernel's CONFIG_CC_VERSION_TEXT.
        kernel: String,
        /// The program we would run.
        program: String,
        /// Its `--version` line.
        found: String,
        /// The package with the right compiler.
        package: String,
    },
    /// The kernel's compiler is not one we can identify.
    #[error(
        "cannot tell which compiler built the kernel from CONFIG_CC_VERSION_TEXT `{0}`; \
         check the kernel-headers' .config"
    )]
    UnknownCompiler(String),
    /// A program could not be run.
    #[error("cannot run `{program} --version`")]
    Run {
        /// The program.
        program: String,
        /// Why: not started, or past [`PROBE_LIMIT`].
        #[source]
        source: RunError,
    },
}

/// A missing tool or a compiler that does not match the kernel is refused before compiling.
impl Classify for ToolchainError {
    fn outcome(&self) -> Outcome {
        match self {
            ToolchainError::Missing { .. }
            | ToolchainError::Mismatch { .. }
            | ToolchainError::UnknownCompiler(_) => Outcome::Refused,
            ToolchainError::Run { .. } => Outcome::Failed,
        }
    }
}

/// `program` in [`SANDBOX_PATH`], if it is there.
pub fn find(program: &str) -> Option<PathBuf> {
    SANDBOX_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Refuse when one of `tools` is missing, naming its package.
pub fn require(tools: &[Tool]) -> Result<(), ToolchainError> {
    match tools.iter().find(|t| find(t.program).is_none()) {
        Some(t) => Err(ToolchainError::Missing {
            program: t.program.into(),
            package: t.package.into(),
        }),
        None => Ok(()),
    }
}

/// The compiler a build uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiler {
    /// The program (`gcc-12`), passed as `CC`.
    pub program: String,
    /// The first line of its `--version` (recorded in the provenance).
    pub version: String,
}

/// The installed compiler that matches the kernel's `CONFIG_CC_VERSION_TEXT`
/// (`gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`): the program it names, else the plain `gcc` or
/// `clang`, of the same major version.
pub fn compiler_for(cc_version_text: &str) -> Result<Compiler, ToolchainError> {
    let unknown = || ToolchainError::UnknownCompiler(cc_version_text.to_string());
    let family = if cc_version_text.contains("clang") {
        "clang"
    } else if cc_version_text.contains("gcc") {
        "gcc"
    } else {
        return Err(unknown());
    };
    let major = version_major(cc_version_text).ok_or_else(unknown)?;
    let named = cc_version_text
        .split_whitespace()
        .next()
        .filter(|w| w.starts_with(family) && !w.contains('/'))
        .unwrap_or(family);
    let package = format!("{family}-{major}");
    let candidates = [
        named.to_string(),
        format!("{family}-{major}"),
        family.to_string(),
    ];
    let mut seen_other = None;
    for program in candidates {
        if find(&program).is_none() {
            continue;
        }
        let version = version_line(&program)?;
        if version_major(&version) == Some(major) {
            return Ok(Compiler { program, version });
        }
        seen_other.get_or_insert((program, version));
    }
    Err(match seen_other {
        Some((program, found)) => ToolchainError::Mismatch {
            kernel: cc_version_text.to_string(),
            program,
            found,
            package,
        },
        None => ToolchainError::Missing {
            program: named.to_string(),
            package,
        },
    })
}

/// The first line of `program --version`.
pub fn version_line(program: &str) -> Result<String, ToolchainError> {
    let out = run_bounded(
        Command::new(program)
            .arg("--version")
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("LC_ALL", "C"),
        PROBE_LIMIT,
    )
    .map_err(|source| ToolchainError::Run {
        program: program.to_string(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// The major version of the last `N.N.N` word of a compiler's version text.
fn version_major(text: &str) -> Option<u32> {
    text.split_whitespace()
        .rev()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .and_then(|w| w.split('.').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_major_version_is_the_last_dotted_number() {
        assert_eq!(
            version_major("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"),
            Some(12)
        );
        assert_eq!(version_major("gcc (GCC) 13.1.1 20230614"), Some(13));
        assert_eq!(version_major("Debian clang version 14.0.6"), Some(14));
        assert_eq!(version_major("no version here"), None);
    }

    #[test]
    fn a_missing_tool_is_refused_naming_its_package() {
        let missing = Tool {
            program: "no-such-build-tool",
            package: "no-such-package",
        };
        let err = require(&[BUILD_TOOLS[0], missing]).unwrap_err().to_string();
        assert!(
            err.contains("no-such-build-tool") && err.contains("no-such-package"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_compiler_is_refused_with_its_text() {
        let err = compiler_for("icc 2021.1").unwrap_err();
        assert!(err.to_string().contains("icc 2021.1"), "{err}");
    }
}
