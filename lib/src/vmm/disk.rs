//! The GPU disk in a boot spec: the erofs image of `/gpu` attached read-only, as virtio-pmem
//! (mapped from the host's page cache, shared by every VM, mounted with DAX) or virtio-blk, and
//! the kernel word that tells the guest init where to find it.

use std::path::PathBuf;

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
}

impl GpuDisk {
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
        }
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
