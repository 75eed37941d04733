//! The GPU payload delivered as a read-only disk image instead of an initramfs layer.
//!
//! The host builds the image (erofs) from the same tree the GPU layer puts under `/gpu`, and a
//! base layer that carries the kernel modules needed to mount it, in load order. The guest init,
//! seeing [`KERNEL_WORD`] on the command line, loads them and mounts the image at `/gpu`.

/// The kernel command-line word: `GPU_DISK=pmem` (virtio-pmem, mounted with DAX) or
/// `GPU_DISK=/dev/vdX` (virtio-blk).
pub const KERNEL_WORD: &str = "GPU_DISK";

/// The value of [`KERNEL_WORD`] meaning "the first virtio-pmem device" (`/dev/pmem0`).
pub const PMEM: &str = "pmem";

/// Directory of the base layer holding the mount modules (`<name>.ko`). Top level, like
/// `/newroot`: the kernel's unpacker makes no parent directories, and an entry for `/lib` would
/// replace a usrmerge initrd's `/lib -> usr/lib` link.
pub const MODULE_DIR: &str = "/gpu-disk";

/// File in [`MODULE_DIR`] listing the module file names to load, one a line, in load order.
pub const ORDER_FILE: &str = "/gpu-disk/order";

/// The kernel modules a guest needs to mount the image, before their own dependencies: the
/// virtio transport, the virtio-pmem path (DAX), virtio-blk, and the file system with the crc32c
/// its `libcrc32c` asks for at run time (not through `depends=`).
pub const MOUNT_MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_pmem",
    "nd_pmem",
    "virtio_blk",
    "crc32c_generic",
    "erofs",
];

/// The mount modules a verity image needs in addition (and their dependencies: `dm_mod`,
/// `dm_bufio`, `reed_solomon`).
pub const VERITY_MODULES: [&str; 1] = ["dm_verity"];

/// The kernel command-line word carrying the image's dm-verity parameters
/// (`GPU_DISK_VERITY=<root hash>:<salt>:<data blocks>:<hash start block>`, see [`Verity`]). It
/// is the trust anchor: a platform that measures the command line measures the image with it.
pub const VERITY_WORD: &str = "GPU_DISK_VERITY";

/// File in the base layer naming the image the layer was built with ([`ImageBinding`]).
pub const IMAGE_FILE: &str = "/gpu-disk/image";

/// The dm-verity parameters of an image: sha256, 4096-byte data and hash blocks, the hash tree
/// appended to the same file after the data (no verity superblock).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verity {
    /// Root hash, lowercase hex.
    pub root_hash: String,
    /// Salt, lowercase hex.
    pub salt: String,
    /// Data blocks (4096 bytes) covered by the tree: the erofs image and its padding.
    pub data_blocks: u64,
    /// Where the hash tree starts, in 4096-byte blocks from the start of the image.
    pub hash_start_block: u64,
}

/// The block size of data and hash blocks.
pub const VERITY_BLOCK: u64 = 4096;
/// The hash algorithm.
pub const VERITY_HASH: &str = "sha256";

impl Verity {
    /// The kernel command-line word.
    pub fn kernel_word(&self) -> String {
        format!(
            "{VERITY_WORD}={}:{}:{}:{}",
            self.root_hash, self.salt, self.data_blocks, self.hash_start_block
        )
    }

    /// Parse the value of [`VERITY_WORD`]; `None` when malformed.
    pub fn parse(value: &str) -> Option<Verity> {
        let hex = |s: &str| {
            !s.is_empty() && s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let mut parts = value.split(':');
        let (root, salt, data, start) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !hex(root) || root.len() != 64 || !(salt == "-" || hex(salt)) {
            return None;
        }
        Some(Verity {
            root_hash: root.to_ascii_lowercase(),
            salt: salt.to_ascii_lowercase(),
            data_blocks: data.parse().ok().filter(|n| *n > 0)?,
            hash_start_block: start.parse().ok()?,
        })
    }

    /// The device-mapper table line of a verity target over `device` (a path or `major:minor`).
    pub fn table(&self, device: &str) -> String {
        format!(
            "1 {device} {device} {VERITY_BLOCK} {VERITY_BLOCK} {} {} {VERITY_HASH} {} {}",
            self.data_blocks, self.hash_start_block, self.root_hash, self.salt
        )
    }

    /// The target's length in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.data_blocks * (VERITY_BLOCK / 512)
    }
}

/// The image a base layer was built with: its erofs UUID and, when built with verity, its root
/// hash. Written to [`IMAGE_FILE`] as `uuid=<uuid>` and `verity=<root hash>` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageBinding {
    /// The erofs UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase).
    pub uuid: String,
    /// The dm-verity root hash, when the image has a hash tree.
    pub verity_root: Option<String>,
}

impl ImageBinding {
    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = format!("uuid={}\n", self.uuid);
        if let Some(root) = &self.verity_root {
            s.push_str(&format!("verity={root}\n"));
        }
        s
    }

    /// Parse the file's text; `None` without a `uuid=` line.
    pub fn parse(text: &str) -> Option<ImageBinding> {
        let mut binding = ImageBinding::default();
        for line in text.lines() {
            match line.trim().split_once('=') {
                Some(("uuid", v)) => binding.uuid = v.to_ascii_lowercase(),
                Some(("verity", v)) => binding.verity_root = Some(v.to_ascii_lowercase()),
                _ => {}
            }
        }
        (!binding.uuid.is_empty()).then_some(binding)
    }
}

/// Byte offset of the 16-byte UUID in an erofs image (superblock at 1024, UUID at 48 in it).
pub const EROFS_UUID_OFFSET: u64 = 1024 + 48;

/// The UUID's usual text form.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verity_words_round_trip_and_malformed_ones_are_refused() {
        let v = Verity {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            data_blocks: 512,
            hash_start_block: 512,
        };
        let word = v.kernel_word();
        let value = word.strip_prefix("GPU_DISK_VERITY=").unwrap();
        assert_eq!(Verity::parse(value), Some(v.clone()));
        for bad in [
            "",
            "ab:cd:1:1",
            &format!("{}:cd:0:1", "ab".repeat(32)),
            &format!("{value}:9"),
        ] {
            assert_eq!(Verity::parse(bad), None, "{bad}");
        }
        assert_eq!(v.sectors(), 4096);
        assert!(
            v.table("254:0")
                .starts_with("1 254:0 254:0 4096 4096 512 512 sha256 abab")
        );
    }

    #[test]
    fn bindings_round_trip() {
        let b = ImageBinding {
            uuid: "0123abcd-0000-4000-8000-000000000000".into(),
            verity_root: Some("ef".repeat(32)),
        };
        assert_eq!(ImageBinding::parse(&b.render()), Some(b));
        assert_eq!(ImageBinding::parse("verity=ab\n"), None);
        let bytes: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(uuid_text(&bytes), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
