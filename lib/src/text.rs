//! `text`: the human-readable form of the library's reports (`Display`), as the CLI shows them
//! without `--json`. One place for the wording, so every front end says the same thing; the
//! library itself still prints nothing.

use std::fmt::{self, Display, Formatter};

use crate::archive::cpio::InitrdEntry;
use crate::attach::{
    CheckStatus, DetachReport, DeviceListing, DeviceReport, DoctorReport, Plan, ReconcileReport,
};
use crate::initrd::{InitrdLayer, LayerFile, Layers};
use crate::pci::PciAddress;
use crate::registry::{ModuleFlavor, Release};
use crate::versions::{
    AddReport, PinReport, ReleaseSummary, VerifyReport, VerifyRow, VerifyStatus,
};
use crate::vmm::{BootSpec, Vmm};

fn join(list: &[PciAddress]) -> String {
    list.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

impl Display for CheckStatus {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "OK",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        })
    }
}

impl Display for DoctorReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{:<5} {:<22} {}", c.status.to_string(), c.name, c.detail)?;
            if !c.fix.is_empty() {
                writeln!(f, "      {:<22} fix: {}", "", c.fix)?;
            }
        }
        writeln!(f, "verdict: {}", self.verdict)
    }
}

impl Display for DeviceListing {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.devices {
            write!(f, "{d}")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

impl Display for DeviceReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let dev = &self.device;
        let name = dev
            .device_name
            .clone()
            .unwrap_or_else(|| format!("{:04x}:{:04x}", dev.vendor_id, dev.device_id));
        let verdict = match (&self.owner, self.ready) {
            (Some(o), _) => format!("attached to {o}"),
            (None, true) => "ready".to_owned(),
            (None, false) => format!("not ready: {}", self.not_ready_because.join("; ")),
        };
        let reset = if dev.reset_methods.is_empty() {
            "-".to_owned()
        } else {
            dev.reset_methods.join(",")
        };
        writeln!(
            f,
            "{}  [{:04x}:{:04x}] class {:06x}  {name}",
            dev.address, dev.vendor_id, dev.device_id, dev.class
        )?;
        writeln!(
            f,
            "    driver {}  group {}  numa {}  boot_vga {}  reset {reset}  {verdict}",
            dev.driver.as_deref().unwrap_or("-"),
            or_dash(dev.iommu_group),
            or_dash(dev.numa_node),
            u8::from(dev.boot_vga),
        )?;
        if !self.companions.is_empty() {
            writeln!(f, "    companions: {}", join(&self.companions))?;
        }
        if !self.iommu_group_members.is_empty() {
            writeln!(f, "    group members: {}", join(&self.iommu_group_members))?;
        }
        if let Some(total) = dev.sriov_total_vfs {
            writeln!(
                f,
                "    SR-IOV: {} of {total} virtual functions enabled",
                dev.sriov_num_vfs.unwrap_or(0)
            )?;
        }
        for m in &dev.mdev_types {
            writeln!(
                f,
                "    mdev type {} ({}): {} available",
                m.id,
                m.name.as_deref().unwrap_or("-"),
                m.available_instances
            )?;
        }
        Ok(())
    }
}

impl Display for Plan {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.devices {
            writeln!(
                f,
                "move {}  {:?} of {}  group {}  {} -> vfio-pci{}",
                d.address,
                d.role,
                d.of,
                or_dash(d.iommu_group),
                d.driver.as_deref().unwrap_or("no driver"),
                if d.adopt {
                    " (already there: adopt)"
                } else {
                    ""
                }
            )?;
        }
        for (parent, t) in &self.mdevs {
            writeln!(f, "create mdev of type {t} on {parent}")?;
        }
        for w in &self.writes {
            writeln!(f, "write {:?} > {}", w.value, w.path.display())?;
        }
        for r in &self.refusals {
            writeln!(f, "REFUSED: {}", r.message)?;
        }
        Ok(())
    }
}

/// A boot spec as text, with the arguments of one VMM; its JSON is the whole spec (both VMMs'
/// arguments), so a front end prints either form from the one value.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(transparent)]
pub struct BootSpecText<'a> {
    /// The spec.
    pub spec: &'a BootSpec,
    /// Whose arguments to show.
    #[serde(skip)]
    pub vmm: Vmm,
}

impl BootSpec {
    /// This spec as text with `vmm`'s arguments.
    pub fn text(&self, vmm: Vmm) -> BootSpecText<'_> {
        BootSpecText { spec: self, vmm }
    }
}

impl Display for BootSpecText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let s = self.spec;
        for d in &s.devices {
            writeln!(
                f,
                "{}  group {}  {}",
                d.sysfs_path.display(),
                or_dash(d.iommu_group),
                d.vfio_device.display()
            )?;
        }
        if !s.held_devices.is_empty() {
            writeln!(
                f,
                "held for group viability (not given to the VM): {}",
                join(&s.held_devices)
            )?;
        }
        if s.kernel_cmdline.is_empty() {
            writeln!(
                f,
                "kernel command line: (nothing to add: no GPU among the devices)"
            )?;
        } else {
            writeln!(f, "kernel command line: {}", s.kernel_cmdline.join(" "))?;
        }
        if let Some(i) = &s.initrd {
            writeln!(f, "initrd: {}", i.display())?;
        }
        writeln!(f, "vmm args: {}", s.args(self.vmm).join(" "))?;
        if self.vmm == Vmm::CloudHypervisor {
            for w in &s.cloud_hypervisor.warnings {
                writeln!(f, "warning: {w}")?;
            }
        }
        if let Some(h) = &s.mmio.hint {
            writeln!(f, "note: {h}")?;
        }
        Ok(())
    }
}

impl Display for DetachReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for d in &self.restored {
            writeln!(
                f,
                "{} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            )?;
            if let Some(c) = &d.health {
                write!(f, "{c}")?;
            }
        }
        for v in &self.released_vgpus {
            writeln!(f, "released vGPU {v}")?;
        }
        Ok(())
    }
}

impl Display for ReconcileReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for o in &self.finished {
            writeln!(f, "finished an interrupted attach for {o}")?;
        }
        for d in &self.rolled_back {
            writeln!(
                f,
                "rolled back {} -> {}",
                d.device,
                d.driver.as_deref().unwrap_or("no driver")
            )?;
        }
        for d in &self.released {
            writeln!(f, "released {} ({} devices)", d.owner, d.restored.len())?;
        }
        for o in &self.kept_alive {
            writeln!(f, "kept {o}: still exists")?;
        }
        for h in &self.kept_in_use {
            let who: Vec<String> = h.holders.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "kept {}: {} is in use ({})",
                h.owner,
                h.device,
                who.join(", ")
            )?;
        }
        for o in &self.kept_unknown {
            writeln!(
                f,
                "kept {o}: cannot tell whether it is gone (declare it gone to release it)"
            )?;
        }
        for e in &self.errors {
            writeln!(f, "ERROR: {e}")?;
        }
        Ok(())
    }
}

impl Display for Release {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "release {}{}",
            self.name,
            if self.default { " (default)" } else { "" }
        )?;
        writeln!(f, "  source:          {}", self.source)?;
        writeln!(f, "  kernel_version:  {}", self.kernel_version)?;
        writeln!(
            f,
            "  driver_version:  {}",
            or_dash(self.driver_version.as_deref())
        )?;
        writeln!(
            f,
            "  module_flavor:   {}",
            self.module_flavor.map_or("-", ModuleFlavor::as_str)
        )?;
        if let Some(s) = &self.signer {
            writeln!(f, "  signer:          {} (key {})", s.subject, s.key_id)?;
        }
        if self.module_sig_force {
            writeln!(
                f,
                "  module_sig_force: the kernel loads signed modules only"
            )?;
        }
        if let Some(b) = &self.build {
            writeln!(f, "  built by:        {}", b.builder)?;
            writeln!(f, "  compiler:        {}", b.compiler)?;
            writeln!(f, "  sandbox:         {}", b.sandbox)?;
            writeln!(f, "  SOURCE_DATE_EPOCH: {}", b.source_date_epoch)?;
        }
        for (arch, list) in &self.artifacts {
            writeln!(f, "  {arch}:")?;
            for a in list {
                writeln!(f, "    {}", a.kind)?;
                match &a.sha256 {
                    Some(d) => writeln!(f, "      sha256: {d}")?,
                    None => writeln!(
                        f,
                        "      sha256: UNPINNED (pin release {} first)",
                        self.name
                    )?,
                }
                writeln!(f, "      size:   {}", or_dash(a.size))?;
                for url in &a.urls {
                    writeln!(f, "      url:    {url}")?;
                }
            }
        }
        Ok(())
    }
}

impl Display for AddReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.release)?;
        if let Some(i) = &self.inspected {
            writeln!(
                f,
                "inspected: {} modules ({}), {} firmware files, {} libraries",
                i.modules.len(),
                i.modules.join(", "),
                i.firmware.len(),
                i.libraries.len()
            )?;
        }
        writeln!(f, "written to {}", self.registry)
    }
}

impl Display for PinReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.pinned.is_empty() {
            return writeln!(
                f,
                "release {}: nothing to pin, every artifact has a digest",
                self.release
            );
        }
        for p in &self.pinned {
            writeln!(
                f,
                "pinned {} {} {} {} bytes",
                self.release, p.arch, p.kind, p.size
            )?;
            writeln!(f, "  sha256 {}", p.sha256)?;
        }
        writeln!(f, "written to {}", self.registry)
    }
}

impl Display for VerifyRow {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}: ", self.release, self.arch, self.kind)?;
        match self.status {
            VerifyStatus::Mismatch => writeln!(
                f,
                "MISMATCH from {}: expected sha256 {} ({} bytes), got {} ({} bytes)",
                self.url.as_deref().unwrap_or("the cache"),
                or_dash(self.expected_sha256.as_deref()),
                self.expected_size.map_or("?".into(), |s| s.to_string()),
                or_dash(self.actual_sha256.as_deref()),
                self.actual_size.map_or("?".into(), |s| s.to_string()),
            ),
            VerifyStatus::Unpinned => writeln!(f, "UNPINNED (no sha256 to check)"),
            VerifyStatus::Error => writeln!(f, "ERROR {}", self.error.as_deref().unwrap_or("")),
            status => writeln!(f, "{}", status.as_str()),
        }
    }
}

/// One line per artifact, then one per cache entry checked.
impl Display for VerifyReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for r in &self.artifacts {
            write!(f, "{r}")?;
        }
        for r in &self.cache {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn layer_line(f: &mut Formatter<'_>, name: &str, l: &LayerFile) -> fmt::Result {
    writeln!(
        f,
        "{name:<9} {:>12} bytes  sha256:{}  {}",
        l.size,
        l.sha256,
        l.path.display()
    )
}

impl Display for Layers {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(
            f,
            "release {} (kernel {}, driver {} {}, {}){}",
            self.release,
            m.kernel_version,
            m.driver_version,
            m.module_flavor,
            m.arch,
            if self.reused {
                ": up to date, nothing built"
            } else {
                ""
            }
        )?;
        layer_line(f, "base", &self.base)?;
        layer_line(f, "gpu", &self.gpu)?;
        layer_line(f, "combined", &self.combined)?;
        if let Some(disk) = &self.disk {
            layer_line(f, "disk", disk)?;
        }
        let order: Vec<_> = m.modules.iter().map(|m| m.name.as_str()).collect();
        writeln!(f, "modules   {}", order.join(" → "))?;
        writeln!(f, "firmware  {}", m.firmware.len())?;
        writeln!(f, "libraries {}", m.libraries.len())?;
        let caps: Vec<&str> = m.capabilities.keys().map(|c| c.as_str()).collect();
        writeln!(f, "capabilities {}", caps.join(","))
    }
}

/// The layers of an initrd file as text, numbered; its JSON is the layers themselves.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(transparent)]
pub struct InitrdText<'a>(pub &'a [InitrdLayer]);

impl Display for InitrdText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for (i, l) in self.0.iter().enumerate() {
            writeln!(
                f,
                "layer {i}: byte {} · {} · {} entries · {} bytes of files",
                l.offset,
                l.compression,
                l.entries.len(),
                l.content_bytes
            )?;
            entry_lines(f, &l.entries)?;
        }
        Ok(())
    }
}

/// What `initrd inspect` found, as text: an initrd's layers ([`InitrdText`]) or a disk image's
/// entries; its JSON is the listing itself.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(transparent)]
pub struct ListingText<'a>(pub &'a crate::initrd::listing::Listing);

impl Display for ListingText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        use crate::initrd::listing::Listing;
        match self.0 {
            Listing::Initrd(layers) => write!(f, "{}", InitrdText(layers)),
            Listing::Disk(image) => {
                writeln!(
                    f,
                    "erofs image · {} bytes · {} entries · {} bytes of files",
                    image.size,
                    image.entries.len(),
                    image.content_bytes
                )?;
                entry_lines(f, &image.entries)
            }
        }
    }
}

fn entry_lines(f: &mut Formatter<'_>, entries: &[InitrdEntry]) -> fmt::Result {
    for e in entries {
        let extra = match (&e.target, e.rdev) {
            (Some(t), _) => format!(" -> {t}"),
            (_, Some((ma, mi))) => format!(" ({ma},{mi})"),
            _ => String::new(),
        };
        writeln!(
            f,
            "  {:<7} {:04o} {:>11}  {}{extra}",
            e.kind, e.mode, e.size, e.path
        )?;
    }
    Ok(())
}

/// The `versions list` table.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseTable<'a>(pub &'a [ReleaseSummary]);

impl Display for ReleaseTable<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} SOURCE",
            "RELEASE", "KERNEL", "DRIVER", "FLAVOR", "ARCH", "PINS"
        )?;
        for r in self.0 {
            let pins = if r.unpinned == 0 {
                format!("{}/{}", r.artifacts, r.artifacts)
            } else {
                format!("UNPINNED {}/{}", r.artifacts - r.unpinned, r.artifacts)
            };
            let arches: Vec<&str> = r.arches.iter().map(|a| a.as_str()).collect();
            writeln!(
                f,
                "{} {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} {}",
                if r.default { "*" } else { " " },
                r.name,
                r.kernel_version,
                or_dash(r.driver_version.as_deref()),
                r.module_flavor.map_or("-", ModuleFlavor::as_str),
                arches.join(","),
                pins,
                r.source
            )?;
        }
        Ok(())
    }
}

impl Display for crate::versions::ReleaseDiff {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        fn opt(v: &Option<String>) -> &str {
            v.as_deref().unwrap_or("-")
        }
        fn set(
            f: &mut Formatter<'_>,
            what: &str,
            d: &crate::versions::diff::SetDiff,
        ) -> fmt::Result {
            for a in &d.added {
                writeln!(f, "  + {what} {a}")?;
            }
            for r in &d.removed {
                writeln!(f, "  - {what} {r}")?;
            }
            Ok(())
        }
        writeln!(f, "{} -> {} ({})", self.from, self.to, self.arch)?;
        if let Some(c) = &self.kernel_version {
            writeln!(f, "  kernel   {} -> {}", c.from, c.to)?;
        }
        if let Some(c) = &self.driver_version {
            writeln!(f, "  driver   {} -> {}", opt(&c.from), opt(&c.to))?;
        }
        if let Some(c) = &self.module_flavor {
            writeln!(f, "  flavor   {} -> {}", opt(&c.from), opt(&c.to))?;
        }
        if let Some(c) = &self.gsp {
            writeln!(f, "  gsp      {} -> {}", c.from, c.to)?;
        }
        set(f, "module", &self.modules)?;
        for p in &self.module_params {
            writeln!(
                f,
                "  ~ module {} parameters `{}` -> `{}`",
                p.module, p.from, p.to
            )?;
        }
        set(f, "firmware", &self.firmware)?;
        for a in &self.libraries.added {
            writeln!(f, "  + library {a}")?;
        }
        for r in &self.libraries.removed {
            writeln!(f, "  - library {r}")?;
        }
        for c in &self.libraries.changed {
            writeln!(f, "  ~ library {}: {} -> {}", c.soname, c.from, c.to)?;
        }
        set(f, "program", &self.programs)?;
        for g in &self.gpus_gained {
            writeln!(f, "  + gpu {} {}", g.device_id, g.name)?;
        }
        for g in &self.gpus_lost {
            writeln!(f, "  - gpu {} {}", g.device_id, g.name)?;
        }
        if self.gpus_gained.is_empty() && self.gpus_lost.is_empty() {
            writeln!(f, "  supported GPUs: unchanged")?;
        }
        for c in &self.provenance {
            writeln!(
                f,
                "  ~ built with {} {} -> {}",
                c.field,
                opt(&c.from),
                opt(&c.to)
            )?;
        }
        Ok(())
    }
}

impl Display for crate::driver_build::Stage {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        use crate::driver_build::Stage;
        match self {
            Stage::Fetch { kind, url } => write!(f, "fetching {kind} {url}"),
            Stage::Check => f.write_str("unpacking and checking the inputs"),
            Stage::CacheHit => f.write_str("built before from the same inputs: no compile"),
            Stage::Patch { patch } => write!(f, "applying {patch}"),
            Stage::Compile { jobs } => write!(f, "compiling in the sandbox (make -j{jobs})"),
            Stage::Finish { sign: true } => f.write_str("stripping and signing the modules"),
            Stage::Finish { sign: false } => f.write_str("stripping the modules"),
            Stage::Inspect => f.write_str("packing and inspecting the modules"),
            Stage::Publish => f.write_str("publishing and writing the registry"),
        }
    }
}

impl Display for crate::versions::build::BuildReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.release)?;
        writeln!(
            f,
            "built {} ({} bytes, sha256 {}){} in {:.1} s",
            self.file_name,
            self.size,
            self.sha256,
            if self.cache_hit {
                " from the build cache"
            } else {
                ""
            },
            self.seconds
        )?;
        for m in &self.modules {
            writeln!(
                f,
                "  {:<20} {:>10} bytes  sha256:{}",
                m.name, m.size, m.sha256
            )?;
        }
        if let Some(p) = &self.published {
            writeln!(f, "published: {}", p.display())?;
        }
        writeln!(f, "logs: {}", self.logs.display())
    }
}

impl Display for crate::versions::build::RebuildReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let how = if self.without_signatures {
            " (modules compared without their signatures: no key given)"
        } else {
            ""
        };
        if self.matches() {
            writeln!(
                f,
                "release {} ({}): the rebuild gives the pinned modules{how}, sha256 {}",
                self.release, self.arch, self.actual_sha256
            )
        } else {
            writeln!(
                f,
                "release {} ({}): the rebuild DIFFERS{how}: pinned sha256 {}, rebuilt {}; \
                 differing: {} (logs: {})",
                self.release,
                self.arch,
                self.expected_sha256,
                self.actual_sha256,
                self.differing.join(", "),
                self.logs.display()
            )
        }
    }
}
