//! The layer cache: a key over every input that determines the layers' bytes, lookup of a
//! complete entry, and the atomic publish of a new one (temporary directory, rename, fsync).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use super::{BUILDER_VERSION, BuildOptions, InitrdBuilder, InitrdError, Layers, RECORD, io_err};
use crate::archive::tar::{Limits, Listing, extract_tar_listed};
use crate::fetch::Progress;

use crate::fsutil::{self, sha256_file};
use crate::registry::{ArtifactKind, Release};

impl InitrdBuilder<'_> {
    fn layers_dir(&self) -> PathBuf {
        self.cache_dir.join("layers")
    }

    /// The cache key: a hash over every input that determines the layers' bytes.
    pub fn key(&self, release: &Release, options: &BuildOptions) -> Result<String, InitrdError> {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &str| {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(value.as_bytes());
            h.update([0]);
        };
        field("builder", &BUILDER_VERSION.to_string());
        field("release", &release.name);
        field("kernel_version", &release.kernel_version);
        field(
            "driver_version",
            release.driver_version.as_deref().unwrap_or(""),
        );
        field("flavor", release.module_flavor.map_or("", |f| f.as_str()));
        field("gsp", if release.gsp { "1" } else { "0" });
        field("arch", options.arch.as_str());
        for kind in ArtifactKind::ALL {
            if let Some(a) = release.artifact(options.arch, kind) {
                let digest = a.sha256.as_ref().map(|d| d.to_string()).unwrap_or_default();
                field(kind.as_str(), &digest);
            }
        }
        field("compression", options.compression.as_str());
        // Only a non-default form joins the key, so existing initrd entries keep theirs.
        if options.form != super::LayerForm::Initrd {
            field("form", options.form.as_str());
        }
        if options.verity && options.form.image() {
            field("verity", "1");
        }
        field("modules", &options.modules.join(","));
        for (m, p) in &options.module_params {
            field(&format!("param:{m}"), p);
        }
        field(
            "capabilities",
            &options
                .capabilities
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
        );
        field("device_mode", &options.device_nodes.mode.to_string());
        field("device_gid", &options.device_nodes.gid.to_string());
        field(
            "guest_init",
            &sha256_file(&options.guest_init).map_err(|source| InitrdError::GuestInit {
                path: options.guest_init.clone(),
                source,
            })?,
        );
        Ok(hex::encode(h.finalize()))
    }

    /// A complete cache entry for `key`, if there is one whose files still have their sizes.
    pub(super) fn cached(&self, key: &str) -> Option<Layers> {
        let dir = self.layers_dir().join(key);
        let text = fs::read_to_string(dir.join(RECORD)).ok()?;
        let mut layers: Layers = serde_json::from_str(&text).ok()?;
        for layer in [&mut layers.base, &mut layers.gpu, &mut layers.combined]
            .into_iter()
            .chain(layers.disk.as_mut())
        {
            // Stored relative so the cache can move; resolved here.
            layer.path = dir.join(&layer.path);
            if fs::metadata(&layer.path).ok()?.len() != layer.size {
                return None;
            }
        }
        layers.supported_gpus = layers.supported_gpus.map(|p| dir.join(p));
        layers.reused = true;
        Some(layers)
    }

    pub(super) fn build_key(
        &self,
        release: &Release,
        options: &BuildOptions,
        key: &str,
        reuse: bool,
        progress: &dyn Progress,
    ) -> Result<Layers, InitrdError> {
        let layers_dir = self.layers_dir();
        fs::create_dir_all(&layers_dir)
            .map_err(io_err(format!("creating {}", layers_dir.display())))?;
        // One builder per key at a time; the others wait and then find the result.
        let lock = lock_file(&layers_dir.join(format!("{key}.lock")))?;
        if reuse {
            // Someone else may have built it while we waited for the lock.
            if let Some(layers) = self.cached(key) {
                return Ok(layers);
            }
        }
        let tmp = layers_dir.join(format!("tmp-{key}"));
        if tmp.exists() {
            // Left by a build that was killed: we hold the key's lock, so nobody else owns it.
            fs::remove_dir_all(&tmp)
                .map_err(io_err(format!("removing stale {}", tmp.display())))?;
        }
        fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let result = self.write_layers(release, options, key, &tmp, progress);
        let layers = match result {
            Ok(layers) => layers,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let dest = layers_dir.join(key);
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err(format!("replacing {}", dest.display())))?;
        }
        fs::rename(&tmp, &dest)
            .map_err(io_err(format!("moving the layers into {}", dest.display())))?;
        fsutil::sync_dir(&layers_dir)
            .map_err(io_err(format!("syncing {}", layers_dir.display())))?;
        drop(lock);
        let mut layers = layers;
        for layer in [&mut layers.base, &mut layers.gpu, &mut layers.combined]
            .into_iter()
            .chain(layers.disk.as_mut())
        {
            layer.path = dest.join(&layer.path);
        }
        layers.supported_gpus = layers.supported_gpus.map(|p| dest.join(p));
        Ok(layers)
    }

    /// Run `build` while the trees of `archives` are unpacked, each archive on its own thread:
    /// the cold path is gzip inflation and file writes, one core's work per archive. `build`
    /// takes each tree from [`Arrivals`] as soon as it is in place, so it can start on the
    /// small archives while the largest is still inflating. The new trees are then synced
    /// together (one `syncfs`: a sync per tree while others are being written stalls the
    /// writers) and only then get their records, which is what makes the cache trust them.
    /// `build` must take every tree, so an unpacking's failure is its failure. Every thread is
    /// joined first, so none outlives the call.
    pub(super) fn with_unpacked<T>(
        &self,
        archives: &[(&Path, &str)],
        build: impl FnOnce(&Arrivals) -> Result<T, InitrdError>,
    ) -> Result<T, InitrdError> {
        let cache = Unpacker {
            cache_dir: &self.cache_dir,
        };
        let (built, unpacked) = std::thread::scope(|scope| {
            let (arrivals, threads): (Vec<_>, Vec<_>) = archives
                .iter()
                .map(|&(archive, sha256)| {
                    let (tx, rx) = mpsc::sync_channel(1);
                    let thread = scope.spawn(move || {
                        // The tree, or the error, for `build`, which must take every tree.
                        let (sent, unpacked) = match cache.unpacked(archive, sha256) {
                            Ok(u) => (Ok(u.tree.clone()), Some(u)),
                            Err(e) => (Err(e), None),
                        };
                        let _ = tx.send(sent);
                        unpacked
                    });
                    (rx, thread)
                })
                .collect();
            let built = build(&Arrivals(arrivals));
            let unpacked: Vec<Option<Unpacked>> = threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect();
            (built, unpacked)
        });
        // Fresh trees are recorded even when `build` failed: they hold verified archives.
        let recorded = record_fresh(unpacked.iter().flatten());
        // `build` took every tree, so it returned any unpacking's error.
        let value = built?;
        recorded?;
        Ok(value)
    }
}

/// The trees of [`InitrdBuilder::with_unpacked`], in the order of its archives.
pub(super) struct Arrivals(Vec<mpsc::Receiver<Result<PathBuf, InitrdError>>>);

impl Arrivals {
    /// The `i`th archive's tree, waiting until it is in place, or why it could not be
    /// unpacked; each is taken once.
    pub(super) fn take(&self, i: usize) -> Result<PathBuf, InitrdError> {
        self.0[i]
            .recv()
            .expect("every unpacking thread sends its tree or its error")
    }
}

/// A tree in place; a fresh one with what its record needs, and its digest's lock held until
/// the record is written.
struct Unpacked {
    tree: PathBuf,
    record: Option<(Listing, PathBuf, nix::fcntl::Flock<fs::File>)>,
}

/// The cache's unpacked trees, apart from the builder so that threads can share it.
#[derive(Clone, Copy)]
struct Unpacker<'a> {
    cache_dir: &'a Path,
}

impl Unpacker<'_> {
    /// Unpack a verified artifact once, kept by digest. The tree is trusted only with its
    /// record, written after the tree is synced (by [`InitrdBuilder::with_unpacked`]): a tree
    /// left without one (a crash, a hand-made directory) is unpacked again. A fresh tree comes
    /// back with its digest's lock held, so a concurrent builder waits for it to be complete.
    fn unpacked(&self, archive: &Path, sha256: &str) -> Result<Unpacked, InitrdError> {
        let root = self.cache_dir.join("unpacked");
        let dest = root.join(sha256);
        let record = super::tree::record_path(&dest);
        let complete = |dest: &Path| dest.is_dir() && record.is_file();
        let done = |tree: &Path| Unpacked {
            tree: tree.to_path_buf(),
            record: None,
        };
        if complete(&dest) {
            return Ok(done(&dest));
        }
        fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
        let lock = lock_file(&root.join(format!("{sha256}.lock")))?;
        if complete(&dest) {
            return Ok(done(&dest));
        }
        for stale in [root.join(format!("tmp-{sha256}")), dest.clone()] {
            if fs::symlink_metadata(&stale).is_ok() {
                fs::remove_dir_all(&stale)
                    .map_err(io_err(format!("removing stale {}", stale.display())))?;
            }
        }
        // Listed as it is written, hashed never: a deep check compares it with the archive.
        let (_, listing) = extract_tar_listed(archive, &dest, &Limits::default())?;
        Ok(Unpacked {
            tree: dest,
            record: Some((listing, record, lock)),
        })
    }
}

/// Sync the fresh trees among `unpacked` (one `syncfs`: they share the cache's file system),
/// then write each one's record.
fn record_fresh<'u>(unpacked: impl Iterator<Item = &'u Unpacked>) -> Result<(), InitrdError> {
    let fresh: Vec<_> = unpacked
        .filter_map(|u| u.record.as_ref().map(|r| (&u.tree, r)))
        .collect();
    let Some((first, _)) = fresh.first() else {
        return Ok(());
    };
    let root = first.parent().unwrap_or(Path::new("."));
    fsutil::sync_filesystem(root).map_err(io_err(format!("syncing {}", root.display())))?;
    fsutil::sync_dir(root).map_err(io_err(format!("syncing {}", root.display())))?;
    for (_, (listing, record, _lock)) in fresh {
        // What the tree holds; its lock is released after.
        super::tree::write_record(&super::tree::from_listing(listing), record)
            .map_err(io_err(format!("recording {}", record.display())))?;
    }
    Ok(())
}

/// An exclusive lock held until the returned value is dropped.
fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<fs::File>, InitrdError> {
    fsutil::lock_exclusive(path).map_err(io_err(format!("locking {}", path.display())))
}
