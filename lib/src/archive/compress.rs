//! Output compression for initrd layers: none, legacy-frame LZ4, zstd, gzip. To be written.
