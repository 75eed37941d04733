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
