//! The GPU disk in a boot spec: the erofs image of `/gpu` attached read-only, as virtio-pmem
//! (mapped from the host's page cache, mounted with DAX) or virtio-blk, and the kernel word that
//! tells the guest init where to find it. The image is the one every VM shares, or a private copy
//! of it in the VM's own directory ([`DiskIsolation`]): the platform's choice.

use std::io;
use std::path::{Path, PathBuf};

use gpu_passthrough_guest_contract::disk::{KERNEL_WORD, PMEM, Verity};
use serde::{Deserialize, Serialize};

/// How the image is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiskAttach {
    /// virtio-pmem: the guest maps the host's pages (DAX), no copy in guest RAM.
    Pmem,
    /// virtio-blk: the guest reads it as a block device (`device`, e.g. `/dev/vda`), with a
    /// reclaimable page cache.
    Blk {
        /// The device node the guest will see.
        device: String,
    },
}

impl std::str::FromStr for DiskAttach {
    type Err = String;

    /// `pmem`, or the virtio-blk device the guest will see (`/dev/vdb`): the `GPU_DISK` value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let plain = |name: &str| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        match s.strip_prefix("/dev/") {
            _ if s == PMEM => Ok(DiskAttach::Pmem),
            Some(name) if plain(name) => Ok(DiskAttach::Blk {
                device: s.to_string(),
            }),
            _ => Err(format!(
                "`{s}` is not a disk attachment: pmem (virtio-pmem, DAX) or the virtio-blk \
                 device the guest will see, such as /dev/vdb"
            )),
        }
    }
}

/// Whose host pages the guest reads the image from.
///
/// Shared: every VM attaches the one image file, so with virtio-pmem and DAX every guest maps
/// the same host page-cache pages (one copy in host memory for all of them) and one tenant can
/// time another's accesses to them (a flush+reload cache side channel across VMs; a virtio-blk
/// guest copies the data into its own RAM but still sees the host cache's residency).
/// Private: the VM attaches its own copy of the image, a separate inode whose page cache no other
/// VM reads. QEMU's `share=off` or Cloud Hypervisor's `discard_writes=on` would not do: they make
/// a private copy-on-write mapping, whose clean pages are still the shared page cache until
/// written, and the guest never writes. A reflink copy (same filesystem, btrfs or XFS) costs no
/// disk, but its page cache is still its own: it costs host memory for what the guest reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskIsolation {
    /// The one image every VM of the release attaches (the default: one copy in host memory).
    #[default]
    Shared,
    /// A copy of the image that only this VM attaches.
    Private,
}

/// How a VM asks for its GPU payload as a disk; [`DiskRequest::default`] asks for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DiskRequest {
    /// The release's GPU payload as a read-only disk instead of the initramfs layer: `pmem`
    /// (virtio-pmem, mapped with DAX) or the virtio-blk device the guest sees (`/dev/vdb`).
    #[cfg_attr(feature = "cli", arg(long = "gpu-disk", value_name = "pmem|/dev/vdX"))]
    pub attach: Option<DiskAttach>,
    /// Attach a private copy of the disk image, made in this VM's own directory (remove it
    /// with the VM), instead of the one image every VM shares: no host page of it is read by
    /// another tenant, at the cost of host memory per VM [default: shared].
    #[cfg_attr(
        feature = "cli",
        arg(long = "gpu-disk-private", value_name = "VM-DIR", requires = "attach")
    )]
    pub private_dir: Option<PathBuf>,
}

impl DiskRequest {
    /// The image every VM shares, attached this way.
    pub fn shared(attach: DiskAttach) -> DiskRequest {
        DiskRequest {
            attach: Some(attach),
            private_dir: None,
        }
    }

    /// A private copy of the image in `vm_dir`, attached this way.
    pub fn private(attach: DiskAttach, vm_dir: impl Into<PathBuf>) -> DiskRequest {
        DiskRequest {
            attach: Some(attach),
            private_dir: Some(vm_dir.into()),
        }
    }

    /// Whether a disk is asked for at all.
    pub fn is_some(&self) -> bool {
        self.attach.is_some()
    }
}

/// The file name of a VM's private copy in its directory.
pub const PRIVATE_IMAGE: &str = "gpu-disk.erofs";

/// The GPU disk of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDisk {
    /// The image file (padded to 2 MiB).
    pub image: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// How it is attached.
    pub attach: DiskAttach,
    /// Its dm-verity root hash and parameters, when built with a hash tree: the guest then
    /// opens it only through dm-verity (no DAX, so serve it over virtio-blk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<Verity>,
    /// Whether `image` is the shared image or this VM's private copy of it.
    #[serde(default)]
    pub isolation: DiskIsolation,
}

impl GpuDisk {
    /// This disk on a private copy of its image in `vm_dir` ([`PRIVATE_IMAGE`]), made there
    /// now: written beside, flushed and renamed into place, so an earlier copy is replaced
    /// whole and a failed copy leaves nothing. The copy is byte for byte (a verity hash tree
    /// appended to the image comes with it), so the base layer's binding and the root hash hold.
    pub fn into_private_copy(self, vm_dir: &Path) -> io::Result<GpuDisk> {
        let copy = vm_dir.join(PRIVATE_IMAGE);
        let partial = vm_dir.join(format!(".{PRIVATE_IMAGE}.partial"));
        // A leftover of a crashed copy is read-only: it goes first.
        let _ = std::fs::remove_file(&partial);
        // `fs::copy` is `copy_file_range`: a reflink where the filesystem shares extents.
        let copied = std::fs::copy(&self.image, &partial).and_then(|_| {
            let file = std::fs::File::open(&partial)?;
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
            file.sync_all()?;
            crate::fsutil::rename_durable(&partial, &copy)
        });
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok(GpuDisk {
            image: copy,
            isolation: DiskIsolation::Private,
            ..self
        })
    }

    /// The kernel command-line word (`GPU_DISK=pmem` or `GPU_DISK=/dev/vdX`).
    pub fn kernel_word(&self) -> String {
        match &self.attach {
            DiskAttach::Pmem => format!("{KERNEL_WORD}={PMEM}"),
            DiskAttach::Blk { device } => format!("{KERNEL_WORD}={device}"),
        }
    }

    /// Every kernel command-line word: [`GpuDisk::kernel_word`] and, for a verity image,
    /// `GPU_DISK_VERITY=`.
    pub fn kernel_words(&self) -> Vec<String> {
        let mut words = vec![self.kernel_word()];
        words.extend(self.verity.as_ref().map(Verity::kernel_word));
        words
    }

    /// QEMU's `-m` value for a VM of `memory_mib`: virtio-pmem is hot-pluggable memory, so the
    /// machine needs memory slots and a `maxmem` above its RAM plus the image.
    pub fn qemu_memory(&self, memory_mib: u64) -> String {
        match self.maxmem_extra_mib() {
            Some(extra) => format!("{memory_mib}M,slots=2,maxmem={}M", memory_mib + extra),
            None => format!("{memory_mib}M"),
        }
    }

    /// What virtio-pmem adds to `maxmem` (the image, in MiB); `None` for virtio-blk.
    pub fn maxmem_extra_mib(&self) -> Option<u64> {
        matches!(self.attach, DiskAttach::Pmem).then(|| self.size.div_ceil(1 << 20))
    }

    /// The QEMU arguments that attach the image (without `-m`: see [`GpuDisk::qemu_memory`]).
    pub fn qemu_device_args(&self) -> Vec<String> {
        let image = self.image.display();
        match &self.attach {
            DiskAttach::Pmem => vec![
                "-object".into(),
                format!(
                    "memory-backend-file,id=gpu0,share=on,readonly=on,mem-path={image},size={}",
                    self.size
                ),
                "-device".into(),
                "virtio-pmem-pci,memdev=gpu0".into(),
            ],
            DiskAttach::Blk { .. } => vec![
                "-drive".into(),
                format!("file={image},if=virtio,readonly=on,format=raw"),
            ],
        }
    }

    /// QEMU arguments for a VM of `memory_mib`: `-m` and the image.
    pub fn qemu_args(&self, memory_mib: u64) -> Vec<String> {
        let mut args = vec!["-m".to_string(), self.qemu_memory(memory_mib)];
        args.extend(self.qemu_device_args());
        args
    }

    /// Cloud Hypervisor arguments.
    pub fn cloud_hypervisor_args(&self) -> Vec<String> {
        let image = self.image.display();
        match &self.attach {
            DiskAttach::Pmem => vec!["--pmem".into(), format!("file={image},discard_writes=on")],
            DiskAttach::Blk { .. } => vec!["--disk".into(), format!("path={image},readonly=on")],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(attach: DiskAttach) -> GpuDisk {
        GpuDisk {
            image: "/c/gpu.erofs".into(),
            size: 216 << 20,
            attach,
            verity: None,
            isolation: DiskIsolation::Shared,
        }
    }

    /// The rendered arguments of every attachment for both VMMs, the image path aside: what
    /// a private copy changes is the file, never the flags.
    fn rendered(d: &GpuDisk) -> (Vec<String>, Vec<String>, Vec<String>) {
        let image = d.image.display().to_string();
        let strip = |args: Vec<String>| -> Vec<String> {
            args.into_iter()
                .map(|a| a.replace(&image, "IMAGE"))
                .collect()
        };
        (
            strip(d.qemu_args(1024)),
            strip(d.cloud_hypervisor_args()),
            d.kernel_words(),
        )
    }

    #[test]
    fn a_private_copy_is_attached_in_place_of_the_shared_image_for_both_vmms() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("cache/gpu.erofs");
        std::fs::create_dir_all(shared.parent().unwrap()).unwrap();
        let bytes: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&shared, &bytes).unwrap();
        let vm = tmp.path().join("vm-1");
        std::fs::create_dir(&vm).unwrap();
        for attach in [
            DiskAttach::Pmem,
            DiskAttach::Blk {
                device: "/dev/vdb".into(),
            },
        ] {
            let d = GpuDisk {
                image: shared.clone(),
                size: bytes.len() as u64,
                ..disk(attach.clone())
            };
            let private = d.clone().into_private_copy(&vm).unwrap();
            assert_eq!(private.isolation, DiskIsolation::Private);
            assert_eq!(private.image, vm.join(PRIVATE_IMAGE));
            assert_eq!(std::fs::read(&private.image).unwrap(), bytes, "{attach:?}");
            let shared_path = shared.display().to_string();
            let copy_path = private.image.display().to_string();
            let qemu = private.qemu_args(1024).join(" ");
            let ch = private.cloud_hypervisor_args().join(" ");
            for args in [&qemu, &ch] {
                assert!(args.contains(&copy_path), "{args}");
                assert!(!args.contains(&shared_path), "{args}");
            }
            let shared_qemu = d.qemu_args(1024).join(" ");
            let shared_ch = d.cloud_hypervisor_args().join(" ");
            for args in [&shared_qemu, &shared_ch] {
                assert!(args.contains(&shared_path), "{args}");
                assert!(!args.contains(&copy_path), "{args}");
            }
            assert_eq!(rendered(&private), rendered(&d), "{attach:?}");
        }
        let json = serde_json::to_value(disk(DiskAttach::Pmem)).unwrap();
        assert_eq!(json["isolation"], "shared");
        // A spec recorded before the choice existed reads as shared.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("isolation");
        let old: GpuDisk = serde_json::from_value(old).unwrap();
        assert_eq!(old.isolation, DiskIsolation::Shared);
    }

    #[test]
    fn a_private_copy_into_a_missing_directory_fails_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("gpu.erofs");
        std::fs::write(&shared, b"image").unwrap();
        let d = GpuDisk {
            image: shared,
            ..disk(DiskAttach::Pmem)
        };
        let e = d
            .into_private_copy(&tmp.path().join("no-such-vm"))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let unreadable = GpuDisk {
            image: tmp.path().join("gone.erofs"),
            ..disk(DiskAttach::Pmem)
        };
        let vm = tmp.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        assert!(unreadable.into_private_copy(&vm).is_err());
        assert_eq!(std::fs::read_dir(&vm).unwrap().count(), 0);
    }

    #[test]
    fn pmem_renders_a_shared_readonly_backend_with_room_in_maxmem() {
        let d = disk(DiskAttach::Pmem);
        assert_eq!(d.kernel_word(), "GPU_DISK=pmem");
        assert_eq!(
            d.qemu_args(1024),
            [
                "-m",
                "1024M,slots=2,maxmem=1240M",
                "-object",
                "memory-backend-file,id=gpu0,share=on,readonly=on,mem-path=/c/gpu.erofs,size=226492416",
                "-device",
                "virtio-pmem-pci,memdev=gpu0",
            ]
        );
        assert_eq!(
            d.cloud_hypervisor_args(),
            ["--pmem", "file=/c/gpu.erofs,discard_writes=on"]
        );
    }

    #[test]
    fn attachments_parse_from_the_kernel_word_values() {
        assert_eq!("pmem".parse(), Ok(DiskAttach::Pmem));
        assert_eq!(
            "/dev/vdb".parse(),
            Ok(DiskAttach::Blk {
                device: "/dev/vdb".into()
            })
        );
        for bad in ["", "vdb", "/dev/", "/dev/../sda", "/dev/vd b", "PMEM"] {
            let e = bad.parse::<DiskAttach>().unwrap_err();
            assert!(e.contains("pmem") && e.contains("/dev/vdb"), "{bad}: {e}");
        }
    }

    #[test]
    fn blk_renders_a_readonly_raw_virtio_drive() {
        let d = disk(DiskAttach::Blk {
            device: "/dev/vdb".into(),
        });
        assert_eq!(d.kernel_word(), "GPU_DISK=/dev/vdb");
        assert_eq!(
            d.qemu_args(512),
            [
                "-m",
                "512M",
                "-drive",
                "file=/c/gpu.erofs,if=virtio,readonly=on,format=raw"
            ]
        );
        assert_eq!(
            d.cloud_hypervisor_args(),
            ["--disk", "path=/c/gpu.erofs,readonly=on"]
        );
    }
}
