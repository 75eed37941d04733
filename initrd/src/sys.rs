//! Thin wrappers over the mount and chroot syscalls the init needs.

use nix::mount::{MsFlags, mount};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Bind-mount `src` on `dst` (recursively), then make the top mount read-only.
pub fn bind_read_only(src: &Path, dst: &Path) -> nix::Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
}

/// Bind-mount `src` on `dst`, read-write.
pub fn bind(src: &Path, dst: &Path) -> nix::Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
}

/// True when both paths name the same inode (e.g. one is already bind-mounted on the other).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Make `cmd` run chrooted in `root` with `/` as working directory.
#[allow(unsafe_code)]
pub fn chroot_command(cmd: &mut Command, root: &Path) {
    let root = root.to_path_buf();
    // SAFETY: the closure runs between fork and exec and only makes two syscalls (chroot,
    // chdir) on data prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
}
