//! The CUDA driver-API probe that runs inside the scratch root: `dlopen("libcuda.so.1")` through
//! that root's loader cache, then `cuInit`, `cuDeviceGetCount`, `cuDeviceGetName`.

use serde::{Deserialize, Serialize};
use std::ffi::{CStr, c_char, c_int, c_void};

/// What the probe saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// `cuInit`'s result (0 = CUDA_SUCCESS), or `None` when libcuda did not load.
    pub init: Option<i32>,
    /// Devices counted.
    pub count: i32,
    /// Their names.
    pub names: Vec<String>,
    /// Why it stopped early.
    pub error: Option<String>,
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;

/// Look a symbol up in a handle from `dlopen`.
#[allow(unsafe_code)]
fn symbol(handle: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `handle` came from a successful dlopen and `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// Run the probe with the library `soname` (normally `libcuda.so.1`).
#[allow(unsafe_code)]
pub fn run(soname: &CStr) -> Probe {
    let mut probe = Probe {
        init: None,
        count: 0,
        names: Vec::new(),
        error: None,
    };
    // SAFETY: dlopen with a NUL-terminated name; the handle is never closed (the process exits).
    let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or NULL.
        let err = unsafe { libc::dlerror() };
        probe.error = Some(if err.is_null() {
            "dlopen failed".into()
        } else {
            // SAFETY: non-NULL dlerror result is a valid C string.
            unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned()
        });
        return probe;
    }
    let (Some(init), Some(count), Some(get), Some(name)) = (
        symbol(handle, c"cuInit"),
        symbol(handle, c"cuDeviceGetCount"),
        symbol(handle, c"cuDeviceGet"),
        symbol(handle, c"cuDeviceGetName"),
    ) else {
        probe.error =
            Some("libcuda lacks cuInit/cuDeviceGetCount/cuDeviceGet/cuDeviceGetName".into());
        return probe;
    };
    // SAFETY: the symbols are the CUDA driver API entry points with these C signatures.
    let (init, count_fn, get, name_fn) = unsafe {
        (
            std::mem::transmute::<*mut c_void, CuInit>(init),
            std::mem::transmute::<*mut c_void, CuCount>(count),
            std::mem::transmute::<*mut c_void, CuGet>(get),
            std::mem::transmute::<*mut c_void, CuName>(name),
        )
    };
    // SAFETY: cuInit takes flags 0.
    let rc = unsafe { init(0) };
    probe.init = Some(rc);
    if rc != 0 {
        probe.error = Some(format!("cuInit returned {rc}"));
        return probe;
    }
    let mut n: c_int = 0;
    // SAFETY: a valid out-pointer.
    let rc = unsafe { count_fn(&mut n) };
    if rc != 0 {
        probe.error = Some(format!("cuDeviceGetCount returned {rc}"));
        return probe;
    }
    probe.count = n;
    for i in 0..n {
        let mut dev: c_int = 0;
        let mut buf = [0 as c_char; 256];
        // SAFETY: valid out-pointers; the buffer length is passed.
        let rc = unsafe {
            let rc = get(&mut dev, i);
            if rc == 0 {
                name_fn(buf.as_mut_ptr(), 256, dev)
            } else {
                rc
            }
        };
        if rc != 0 {
            probe.error = Some(format!("cuDeviceGet/GetName({i}) returned {rc}"));
            break;
        }
        // SAFETY: cuDeviceGetName NUL-terminates within the buffer.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        probe.names.push(name.to_string_lossy().into_owned());
    }
    probe
}
