//! A dm-verity device over the GPU disk, made with the device-mapper ioctls directly
//! (`DM_DEV_CREATE`, `DM_TABLE_LOAD`, `DM_DEV_SUSPEND` to resume): the guest has no `dmsetup`.
//!
//! The ABI is `include/uapi/linux/dm-ioctl.h`: every call passes a `struct dm_ioctl` (312 bytes,
//! version 4) followed by its data; a table load's data is one `struct dm_target_spec` (40 bytes)
//! and its NUL-terminated parameters.

use gpu_passthrough_guest_contract::disk::Verity;
use nix::errno::Errno;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The device-mapper control node (devtmpfs makes it when `dm_mod` loads).
pub const CONTROL: &str = "/dev/mapper/control";
/// The name of the verity device.
pub const NAME: &str = "gpu-disk";

const HEADER: usize = 312;
const SPEC: usize = 40;
const BUFFER: usize = 4096;
const DEV_CREATE: u64 = 3;
const DEV_SUSPEND: u64 = 6;
const TABLE_LOAD: u64 = 9;
const READONLY_FLAG: u32 = 1;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
const fn request(nr: u64) -> u64 {
    (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | nr
}

/// A failed device-mapper step.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {errno}")]
pub struct DmError {
    /// What was being done.
    pub step: &'static str,
    /// What the kernel said.
    pub errno: Errno,
}

/// Makes a read-only dm-verity device over a block device: the real ioctls, or a fake in tests.
pub trait DeviceMapper {
    /// Create the device `NAME` checking `device` against `verity`; returns its node.
    fn create_verity(&self, device: &Path, verity: &Verity) -> Result<PathBuf, DmError>;
}

/// The kernel's device mapper.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelDm;

/// A `struct dm_ioctl` for `name`, with `data` after it.
fn message(name: &str, flags: u32, target_count: u32, data: &[u8]) -> Vec<u64> {
    let mut buffer = vec![0u8; BUFFER];
    let bytes = buffer.as_mut_slice();
    let put = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    put(bytes, 0, 4); // version 4.0.0
    put(bytes, 12, BUFFER as u32); // data_size: the whole buffer
    put(bytes, 16, HEADER as u32); // data_start
    put(bytes, 20, target_count);
    put(bytes, 28, flags);
    bytes[48..48 + name.len()].copy_from_slice(name.as_bytes());
    bytes[HEADER..HEADER + data.len()].copy_from_slice(data);
    // As u64 words: the kernel reads the header's u64 field aligned.
    buffer
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

#[allow(unsafe_code)]
fn call(
    control: &std::fs::File,
    nr: u64,
    words: &mut [u64],
    step: &'static str,
) -> Result<(), DmError> {
    // SAFETY: the buffer is BUFFER bytes, as data_size tells the kernel.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request(nr) as _, words.as_mut_ptr()) };
    Errno::result(rc)
        .map(drop)
        .map_err(|errno| DmError { step, errno })
}

/// The target spec and parameters of one verity target.
fn verity_spec(verity: &Verity, device: &str) -> Vec<u8> {
    let params = verity.table(device);
    let mut spec = vec![0u8; SPEC];
    spec[8..16].copy_from_slice(&verity.sectors().to_ne_bytes());
    spec[24..24 + "verity".len()].copy_from_slice(b"verity");
    spec.extend_from_slice(params.as_bytes());
    spec.push(0);
    spec.resize(spec.len().div_ceil(8) * 8, 0);
    let next = spec.len() as u32;
    spec[20..24].copy_from_slice(&next.to_ne_bytes());
    spec
}

impl DeviceMapper for KernelDm {
    fn create_verity(&self, device: &Path, verity: &Verity) -> Result<PathBuf, DmError> {
        let meta = std::fs::metadata(device).map_err(|e| DmError {
            step: "reading the disk's device number",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
        let rdev = meta.rdev();
        let target = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        let control = std::fs::File::options()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| DmError {
                step: "opening /dev/mapper/control (is dm_mod loaded?)",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            })?;
        call(
            &control,
            DEV_CREATE,
            &mut message(NAME, 0, 0, &[]),
            "DM_DEV_CREATE",
        )?;
        let spec = verity_spec(verity, &target);
        call(
            &control,
            TABLE_LOAD,
            &mut message(NAME, READONLY_FLAG, 1, &spec),
            "DM_TABLE_LOAD (verity)",
        )?;
        let mut resume = message(NAME, 0, 0, &[]);
        call(
            &control,
            DEV_SUSPEND,
            &mut resume,
            "DM_DEV_SUSPEND (resume)",
        )?;
        let dev = resume[5]; // bytes 40..48: the new device's number
        let node = PathBuf::from(format!("/dev/dm-{}", libc::minor(dev as libc::dev_t)));
        let is_block = std::fs::metadata(&node).is_ok_and(|m| m.file_type().is_block_device());
        if !is_block {
            // No devtmpfs: make the node ourselves.
            nix::sys::stat::mknod(
                &node,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev as libc::dev_t,
            )
            .map_err(|errno| DmError {
                step: "creating the verity device node",
                errno,
            })?;
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn requests_match_the_kernel_header() {
        // From <linux/dm-ioctl.h> on x86_64: DM_DEV_CREATE, DM_DEV_SUSPEND, DM_TABLE_LOAD.
        assert_eq!(request(DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(DEV_SUSPEND), 0xc138_fd06);
        assert_eq!(request(TABLE_LOAD), 0xc138_fd09);
    }

    #[test]
    fn a_table_load_carries_one_verity_target_after_the_header() {
        let v = Verity {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            data_blocks: 100,
            hash_start_block: 100,
        };
        let spec = verity_spec(&v, "254:16");
        let msg = bytes(&message(NAME, READONLY_FLAG, 1, &spec));
        assert_eq!(&msg[0..4], &4u32.to_ne_bytes());
        assert_eq!(&msg[16..20], &(HEADER as u32).to_ne_bytes());
        assert_eq!(&msg[20..24], &1u32.to_ne_bytes());
        assert_eq!(&msg[28..32], &READONLY_FLAG.to_ne_bytes());
        assert_eq!(&msg[48..56], b"gpu-disk");
        let s = &msg[HEADER..];
        assert_eq!(
            u64::from_ne_bytes(s[8..16].try_into().unwrap()),
            800,
            "sectors"
        );
        assert_eq!(&s[24..30], b"verity");
        let params_end = SPEC + s[SPEC..].iter().position(|b| *b == 0).unwrap();
        let params = std::str::from_utf8(&s[SPEC..params_end]).unwrap();
        assert_eq!(params, v.table("254:16"));
        assert_eq!(
            u32::from_ne_bytes(s[20..24].try_into().unwrap()) as usize % 8,
            0
        );
    }
}
