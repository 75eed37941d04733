//! `fabric`: NVIDIA's fabric manager in shared-NVSwitch mode, where the NVSwitches stay with
//! the host (on `nvidia`, driven by `nv-fabricmanager`) and GPUs go to VMs in the partitions
//! the fabric manager defines: a partition is activated before its GPUs leave the host and
//! deactivated once they are back.
//!
//! [`FabricManager`] is the seam: [`Fmpm`] drives NVIDIA's partition tool (`fmpm -l`, `-a ID`,
//! `-d ID`, from NVIDIA's Fabric-Manager-Client) under a time limit, and [`PartitionFile`]
//! keeps the same partition list in a file (tests, and hosts whose partitions another tool
//! activates). Both read the JSON `fmpm -l` prints: `partitionInfo[]` with `partitionId`,
//! `isActive`, `numGpus` and `gpuInfo[]` (`physicalId`, `pciBusId` as NVML writes it,
//! `00000000:1B:00.0`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outcome::{Classify, Outcome};
use crate::pci::PciAddress;
use crate::tools::{RunError, run_bounded};

/// How long one `fmpm` run may take by default: the fabric manager answers in well under a
/// second; activating a partition trains its NVLinks, which takes seconds.
pub const DEFAULT_FMPM_TIMEOUT: Duration = Duration::from_secs(60);

/// One fabric partition: the GPUs that share NVLink through the host's NVSwitches when it is
/// active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// The fabric manager's partition ID.
    pub id: u32,
    /// Its GPUs, sorted.
    pub gpus: Vec<PciAddress>,
    /// Whether it is active now.
    pub active: bool,
}

/// The fabric manager's partition list, asked for at most once per operation: listing the
/// host's devices plans each of them, and that is one `fmpm -l`, not one per GPU.
pub(crate) type Partitions = std::cell::OnceCell<Result<Vec<Partition>, FabricError>>;

/// What goes wrong talking to the fabric manager.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// The program could not be started.
    #[error("cannot run {command}: is NVIDIA's fmpm installed at that path?")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its time limit and was killed.
    #[error(
        "{command} did not answer within {after:?} and was killed: is nv-fabricmanager running (systemctl status nvidia-fabricmanager)?"
    )]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        after: Duration,
    },
    /// It exited with an error.
    #[error("{command} failed ({status}): {output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (trimmed).
        output: String,
    },
    /// Its partition list could not be read.
    #[error("cannot read the partition list from {source_name}: {detail}")]
    Parse {
        /// The command or file it came from.
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// The partition file could not be read or written.
    #[error("cannot use the partition file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No partition has this ID.
    #[error("the fabric manager has no partition {id}")]
    NoSuchPartition {
        /// The ID.
        id: u32,
    },
}

/// A fabric manager that cannot be asked or does not act is a failure of the host.
impl Classify for FabricError {
    fn outcome(&self) -> Outcome {
        match self {
            FabricError::Spawn { .. }
            | FabricError::Timeout { .. }
            | FabricError::Failed { .. }
            | FabricError::Parse { .. }
            | FabricError::File { .. }
            | FabricError::NoSuchPartition { .. } => Outcome::Failed,
        }
    }
}

/// The host's fabric manager in shared-NVSwitch mode.
pub trait FabricManager: Send + Sync {
    /// Every partition it supports, with whether it is active.
    fn partitions(&self) -> Result<Vec<Partition>, FabricError>;
    /// Activate partition `id` (its GPUs must be free of any host driver's use).
    fn activate(&self, id: u32) -> Result<(), FabricError>;
    /// Deactivate partition `id`.
    fn deactivate(&self, id: u32) -> Result<(), FabricError>;
}

/// NVIDIA's `fmpm`, each run killed past its time limit.
#[derive(Debug, Clone)]
pub struct Fmpm {
    program: PathBuf,
    timeout: Duration,
}

impl Fmpm {
    /// `fmpm` at `program`, with [`DEFAULT_FMPM_TIMEOUT`].
    pub fn new(program: impl Into<PathBuf>) -> Fmpm {
        Fmpm {
            program: program.into(),
            timeout: DEFAULT_FMPM_TIMEOUT,
        }
    }

    /// Kill a run past `limit`.
    pub fn with_timeout(mut self, limit: Duration) -> Fmpm {
        self.timeout = limit;
        self
    }

    fn run(&self, args: &[&str]) -> Result<String, FabricError> {
        let command = format!("{} {}", self.program.display(), args.join(" "));
        let output = run_bounded(Command::new(&self.program).args(args), self.timeout).map_err(
            |e| match e {
                RunError::TimedOut { after, .. } => FabricError::Timeout {
                    command: command.clone(),
                    after,
                },
                RunError::Start { source, .. } => FabricError::Spawn {
                    command: command.clone(),
                    source,
                },
            },
        )?;
        let status = output.status;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        // fmpm prints "Failed to ..." on stdout and may still exit 0 on older versions.
        if !status.success() || stdout.trim_start().starts_with("Failed") {
            return Err(FabricError::Failed {
                command,
                status: status.to_string(),
                output: format!("{} {}", stdout.trim(), stderr.trim())
                    .trim()
                    .to_owned(),
            });
        }
        Ok(stdout)
    }
}

impl FabricManager for Fmpm {
    fn partitions(&self) -> Result<Vec<Partition>, FabricError> {
        let text = self.run(&["-l"])?;
        parse_partition_list(&text).map_err(|detail| FabricError::Parse {
            source_name: format!("{} -l", self.program.display()),
            detail,
        })
    }

    fn activate(&self, id: u32) -> Result<(), FabricError> {
        self.run(&["-a", &id.to_string()]).map(drop)
    }

    fn deactivate(&self, id: u32) -> Result<(), FabricError> {
        self.run(&["-d", &id.to_string()]).map(drop)
    }
}

/// The partition list kept in a file, in `fmpm -l`'s JSON; activation flips `isActive`.
#[derive(Debug, Clone)]
pub struct PartitionFile {
    path: PathBuf,
}

impl PartitionFile {
    /// Partitions in `path`.
    pub fn new(path: impl Into<PathBuf>) -> PartitionFile {
        PartitionFile { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn set_active(&self, id: u32, active: bool) -> Result<(), FabricError> {
        let file_error = |source| FabricError::File {
            path: self.path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&self.path).map_err(file_error)?;
        let parse_error = |detail: String| FabricError::Parse {
            source_name: self.path.display().to_string(),
            detail,
        };
        let mut list: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        let entry = list["partitionInfo"]
            .as_array_mut()
            .and_then(|a| {
                a.iter_mut()
                    .find(|p| p["partitionId"].as_u64() == Some(id.into()))
            })
            .ok_or(FabricError::NoSuchPartition { id })?;
        // As the fabric manager does: activating an active partition (or the reverse) fails.
        if (entry["isActive"].as_u64() == Some(1)) == active {
            return Err(FabricError::Failed {
                command: format!("{} partition {id}", self.path.display()),
                status: "refused".into(),
                output: format!(
                    "partition {id} is already {}",
                    if active { "active" } else { "inactive" }
                ),
            });
        }
        entry["isActive"] = u32::from(active).into();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| parse_error(e.to_string()))?;
        crate::fsutil::write_atomic(&self.path, &bytes).map_err(file_error)
    }
}

impl FabricManager for PartitionFile {
    fn partitions(&self) -> Result<Vec<Partition>, FabricError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| FabricError::File {
            path: self.path.clone(),
            source,
        })?;
        parse_partition_list(&text).map_err(|detail| FabricError::Parse {
            source_name: self.path.display().to_string(),
            detail,
        })
    }

    fn activate(&self, id: u32) -> Result<(), FabricError> {
        self.set_active(id, true)
    }

    fn deactivate(&self, id: u32) -> Result<(), FabricError> {
        self.set_active(id, false)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FmpmList {
    #[serde(default)]
    partition_info: Vec<FmpmPartition>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FmpmPartition {
    partition_id: u32,
    is_active: u32,
    num_gpus: usize,
    #[serde(default)]
    gpu_info: Vec<FmpmGpu>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FmpmGpu {
    physical_id: u32,
    #[serde(default)]
    pci_bus_id: String,
}

/// The partitions of `fmpm -l`'s JSON; an error says what is wrong.
pub fn parse_partition_list(text: &str) -> Result<Vec<Partition>, String> {
    let list: FmpmList = serde_json::from_str(text).map_err(|e| e.to_string())?;
    list.partition_info
        .into_iter()
        .map(|p| {
            if p.gpu_info.len() != p.num_gpus {
                return Err(format!(
                    "partition {} says numGpus {} but lists {} GPUs",
                    p.partition_id,
                    p.num_gpus,
                    p.gpu_info.len()
                ));
            }
            let mut gpus = p
                .gpu_info
                .iter()
                .map(|g| {
                    nvml_bus_id(&g.pci_bus_id).ok_or_else(|| {
                        format!(
                            "partition {}: GPU {} has no PCI address it can be found by (pciBusId `{}`)",
                            p.partition_id, g.physical_id, g.pci_bus_id
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            gpus.sort();
            Ok(Partition {
                id: p.partition_id,
                gpus,
                active: p.is_active != 0,
            })
        })
        .collect()
}

/// A PCI address as NVML writes it (`00000000:1B:00.0`: a 32-bit domain, upper case).
fn nvml_bus_id(s: &str) -> Option<PciAddress> {
    let (domain, rest) = s.trim().split_once(':')?;
    let domain = u16::try_from(u32::from_str_radix(domain, 16).ok()?).ok()?;
    format!("{domain:04x}:{}", rest.to_ascii_lowercase())
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as jsoncpp's StyledWriter prints `fmpm -l` (two partitions of an HGX board).
    const LIST: &str = r#"{
   "maxNumPartitions" : 31,
   "numPartitions" : 2,
   "partitionInfo" : [
      {
         "gpuInfo" : [
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:1B:00.0",
               "physicalId" : 1,
               "uuid" : "GPU-0c4a0c4a-0000-0000-0000-000000000001"
            },
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:43:00.0",
               "physicalId" : 2,
               "uuid" : "GPU-0c4a0c4a-0000-0000-0000-000000000002"
            }
         ],
         "isActive" : 1,
         "numGpus" : 2,
         "partitionId" : 9
      },
      {
         "gpuInfo" : [],
         "isActive" : 0,
         "numGpus" : 0,
         "partitionId" : 30
      }
   ],
   "version" : 16777240
}
"#;

    #[test]
    fn fmpm_list_is_parsed_with_nvml_bus_ids() {
        let p = parse_partition_list(LIST).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].id, 9);
        assert!(p[0].active);
        assert_eq!(
            p[0].gpus,
            [
                "0000:1b:00.0".parse::<PciAddress>().unwrap(),
                "0000:43:00.0".parse().unwrap()
            ]
        );
        assert!(!p[1].active && p[1].gpus.is_empty());
    }

    #[test]
    fn a_list_that_contradicts_itself_is_refused() {
        let bad = LIST.replace("\"numGpus\" : 2", "\"numGpus\" : 3");
        assert!(
            parse_partition_list(&bad)
                .unwrap_err()
                .contains("numGpus 3")
        );
        let no_bus = LIST.replace("00000000:43:00.0", "");
        assert!(
            parse_partition_list(&no_bus)
                .unwrap_err()
                .contains("GPU 2 has no PCI address")
        );
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fmpm");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn fmpm_is_run_with_its_arguments_and_killed_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let list = dir.path().join("list.json");
        std::fs::write(&list, LIST).unwrap();
        let fm = Fmpm::new(script(
            dir.path(),
            &format!(
                "echo \"$@\" >> {}\n[ \"$1\" = -l ] && cat {}\nexit 0",
                log.display(),
                list.display()
            ),
        ));
        assert_eq!(fm.partitions().unwrap().len(), 2);
        fm.activate(9).unwrap();
        fm.deactivate(9).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "-l\n-a 9\n-d 9\n");
        let failing = Fmpm::new(script(
            dir.path(),
            "echo 'Failed to activate partition. fmReturn: -13'; exit 243",
        ));
        let e = failing.activate(3).unwrap_err();
        assert!(e.to_string().contains("fmReturn: -13"), "{e}");
        let hung =
            Fmpm::new(script(dir.path(), "exec sleep 30")).with_timeout(Duration::from_millis(200));
        let e = hung.partitions().unwrap_err();
        assert!(matches!(e, FabricError::Timeout { .. }), "{e}");
    }

    #[test]
    fn the_partition_file_flips_activation_and_refuses_a_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let f = PartitionFile::new(dir.path().join("p.json"));
        std::fs::write(f.path(), LIST).unwrap();
        f.activate(30).unwrap();
        assert!(f.partitions().unwrap()[1].active);
        assert!(f.activate(30).is_err());
        f.deactivate(30).unwrap();
        f.deactivate(9).unwrap();
        assert!(f.partitions().unwrap().iter().all(|p| !p.active));
        assert!(matches!(
            f.activate(4),
            Err(FabricError::NoSuchPartition { id: 4 })
        ));
    }
}
