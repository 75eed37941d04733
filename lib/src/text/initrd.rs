//! The text of the initrd's reports: the layers built, an initrd's entries, a disk listing.

use std::fmt::{self, Display, Formatter};

use crate::archive::cpio::InitrdEntry;
use crate::initrd::{InitrdLayer, LayerFile, Layers};

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
        if let Some(v) = &self.verity {
            writeln!(
                f,
                "verity    root {} salt {} (sha256, 4096-byte blocks, {} data blocks, tree at \
                 block {}; boot word GPU_DISK_VERITY=…; serve over virtio-blk: no DAX through \
                 dm-verity)",
                v.root_hash, v.salt, v.data_blocks, v.hash_start_block
            )?;
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
