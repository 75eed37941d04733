//! Thin wrappers over the mount and chroot syscalls the init needs.

use nix::mount::{MsFlags, mount};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Bind-mount `src` on `dst` (recursively), then make the top mount read-only.
pub fn bind_read_only(src: &Path, dst: &Path) -> nix::Result<()> {
    bind(src, dst)?;
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

/// Bind-mount `src` (recursively, read-only) on the file or directory behind `target`, a handle
/// opened inside the workload root: the kernel never re-resolves the target's path, so a symlink
/// cannot redirect the mount. Needs the new mount API (Linux 5.12).
#[allow(unsafe_code)]
pub fn bind_read_only_at(src: &Path, target: BorrowedFd<'_>) -> nix::Result<()> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
    let errno = |e: rustix::io::Errno| nix::errno::Errno::from_raw(e.raw_os_error());
    let tree = open_tree(
        rustix::fs::CWD,
        src,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(errno)?;
    // struct mount_attr of mount_setattr(2); neither rustix nor libc wraps the call.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr only reads `attr` (its size is passed) and the empty C string, both
    // alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(nix::errno::Errno::last());
    }
    move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)
}

/// Make `cmd` run in the workload root (the handle `root`) with no privilege: chrooted, every
/// capability dropped (bounding and ambient sets too, and root's exec-time grant switched off by
/// the locked securebits), and `no_new_privs`, so neither the program nor anything it execs can
/// leave the root or act on the guest. It keeps uid 0 only to rewrite root-owned files of the root.
#[allow(unsafe_code)]
pub fn unprivileged_in_root(cmd: &mut Command, root: BorrowedFd<'_>) {
    let root = root.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes syscalls on integers prepared
    // before the fork; it allocates nothing. `root` stays open until exec (it is CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            use rustix::thread as t;
            let err = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
            nix::unistd::fchdir(BorrowedFd::borrow_raw(root))?;
            nix::unistd::chroot(".")?;
            nix::unistd::chdir("/")?;
            for cap in 0..64u32 {
                let one = t::CapabilitySet::from_bits_retain(1 << cap);
                match t::remove_capability_from_bounding_set(one) {
                    Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                    Err(e) => return Err(err(e)),
                }
            }
            t::clear_ambient_capability_set().map_err(err)?;
            t::set_capabilities_secure_bits(
                t::CapabilitiesSecureBits::NO_ROOT
                    | t::CapabilitiesSecureBits::NO_ROOT_LOCKED
                    | t::CapabilitiesSecureBits::NO_SETUID_FIXUP
                    | t::CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED
                    | t::CapabilitiesSecureBits::KEEP_CAPS_LOCKED,
            )
            .map_err(err)?;
            t::set_no_new_privs(true).map_err(err)?;
            let none = t::CapabilitySet::empty();
            t::set_capabilities(
                None,
                t::CapabilitySets {
                    effective: none,
                    permitted: none,
                    inheritable: none,
                },
            )
            .map_err(err)?;
            Ok(())
        });
    }
}
