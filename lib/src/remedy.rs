//! `remedy`: which of the caller's settings fixes an error. Library messages say what is wrong in
//! the library's terms; a front end names its own knob for it (the CLI a flag, a control plane an
//! API field). Each error type names its remedy in its [`Classify`](crate::outcome::Classify)
//! answer; this module is the vocabulary only.

/// A setting of the caller's that fixes an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remedy {
    /// Point the sysfs root at a sysfs tree.
    SysfsRoot,
    /// Use a writable state dir.
    StateDir,
    /// Use a writable cache dir with space.
    CacheDir,
    /// Name an existing registry file.
    RegistryFile,
    /// Name devices or a number of GPUs.
    NameDevices,
    /// Allow moving the boot display.
    AllowBootVga,
    /// Pin this release's artifacts.
    PinRelease(String),
    /// Run reconcile once the cause is fixed.
    Reconcile,
    /// Give the path of the static guest init.
    GuestInit,
    /// Declare an owner gone whose liveness cannot be judged, so reconcile releases it.
    DeclareGone,
}
