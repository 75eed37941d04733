//! Kernel module metadata from real modules (the fixtures' NVIDIA and Debian modules), their
//! compressed forms, and synthesized ones.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gpu_passthrough::archive::tar::{Limits, extract_tar};
use gpu_passthrough::modinfo::{ModInfo, ModinfoError};
use proptest::prelude::*;

/// The shared fixtures directory, through the one lookup every test uses.
fn fixtures() -> PathBuf {
    gpu_passthrough_tests::fixtures::dir()
}

const KVER: &str = "6.1.0-56-amd64";

/// The NVIDIA modules tree, extracted once for this test binary.
fn nvidia_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = gpu_passthrough_tests::fixtures::process_scratch(
            env!("CARGO_TARGET_TMPDIR"),
            "modinfo",
        );
        let archive = fixtures().join(format!(
            "nvidia-535.261.03/nvidia-open-modules-535.261.03-{KVER}-x86_64.tar.gz"
        ));
        extract_tar(&archive, &tmp.join("t"), &Limits::default()).unwrap();
        tmp
    })
}

fn gpu_module(name: &str) -> PathBuf {
    nvidia_modules().join(format!("t/lib/modules/{KVER}/kernel/drivers/gpu/{name}.ko"))
}

#[test]
fn reads_the_real_nvidia_module() {
    let info = ModInfo::from_path(&gpu_module("nvidia")).unwrap();
    assert_eq!(info.name(), Some("nvidia"));
    assert_eq!(info.version(), Some("535.261.03"));
    assert_eq!(
        info.vermagic(),
        Some("6.1.0-56-amd64 SMP preempt mod_unload modversions ")
    );
    assert_eq!(info.vermagic_release(), Some(KVER));
    assert_eq!(info.depends(), vec!["drm"]);
    let mut firmware = info.firmware();
    firmware.sort();
    assert_eq!(
        firmware,
        vec![
            "nvidia/535.261.03/gsp_ga10x.bin",
            "nvidia/535.261.03/gsp_tu10x.bin"
        ]
    );
    assert_eq!(info.elf_machine(), 62);
    assert_eq!(info.all("parmtype").len(), 42, "repeated keys are all kept");

    let drm = ModInfo::from_path(&gpu_module("nvidia-drm")).unwrap();
    assert_eq!(drm.name(), Some("nvidia_drm"));
    assert_eq!(
        drm.depends(),
        vec!["drm", "drm_kms_helper", "nvidia-modeset"]
    );
    // Long parm= descriptions survive intact.
    let uvm = ModInfo::from_path(&gpu_module("nvidia-uvm")).unwrap();
    assert_eq!(uvm.all("parm").len(), 23);
    assert_eq!(uvm.all("parm").iter().map(|p| p.len()).max(), Some(271));
    let peermem = ModInfo::from_path(&gpu_module("nvidia-peermem")).unwrap();
    assert!(
        peermem.depends().is_empty(),
        "empty depends= gives no dependency"
    );
}

#[test]
fn parse_and_from_path_agree() {
    let path = gpu_module("nvidia-uvm");
    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        ModInfo::parse(&bytes).unwrap(),
        ModInfo::from_path(&path).unwrap()
    );
}

#[test]
fn compressed_modules_are_recognised_by_magic() {
    let plain_path = gpu_module("nvidia-drm");
    let plain = fs::read(&plain_path).unwrap();
    let expected = ModInfo::parse(&plain).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let xz = tmp.path().join("nvidia-drm.ko.xz");
    fs::write(&xz, liblzma::encode_all(&plain[..], 1).unwrap()).unwrap();
    let zst = tmp.path().join("nvidia-drm.ko.zst");
    fs::write(&zst, zstd::encode_all(&plain[..], 1).unwrap()).unwrap();
    // A misleading name: the magic decides.
    let gz = tmp.path().join("nvidia-drm.ko");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&plain).unwrap();
    fs::write(&gz, enc.finish().unwrap()).unwrap();

    for path in [&xz, &zst, &gz] {
        assert_eq!(ModInfo::from_path(path).unwrap(), expected, "{path:?}");
    }
}

#[test]
fn errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("not-a-module.ko");
    fs::write(&text, b"hello").unwrap();
    let err = ModInfo::from_path(&text).unwrap_err();
    assert!(matches!(err, ModinfoError::NotElf { .. }), "{err:?}");
    assert!(err.to_string().contains("not-a-module.ko"));

    // A real ELF without .modinfo: a shared library is not a module.
    let exe = std::env::current_exe().unwrap();
    let err = ModInfo::from_path(&exe).unwrap_err();
    assert!(matches!(err, ModinfoError::NoModinfo { .. }), "{err:?}");

    let truncated = tmp.path().join("truncated.ko");
    let bytes = fs::read(gpu_module("nvidia-peermem")).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(ModInfo::from_path(&truncated).is_err());

    let missing = ModInfo::from_path(&tmp.path().join("gone.ko")).unwrap_err();
    assert!(matches!(missing, ModinfoError::Io { .. }));
}

/// A minimal ELF64 relocatable object holding one `.modinfo` section.
fn synth_elf(modinfo: &[u8], machine: u16) -> Vec<u8> {
    let shstrtab = b"\0.modinfo\0.shstrtab\0";
    let data_off = 64u64;
    let shstr_off = data_off + modinfo.len() as u64;
    let sh_off = (shstr_off + shstrtab.len() as u64).div_ceil(8) * 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    out.extend_from_slice(&machine.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // entry
    out.extend_from_slice(&0u64.to_le_bytes()); // phoff
    out.extend_from_slice(&sh_off.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    out.extend_from_slice(&0u16.to_le_bytes()); // phentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    out.extend_from_slice(&3u16.to_le_bytes()); // shnum
    out.extend_from_slice(&2u16.to_le_bytes()); // shstrndx
    out.extend_from_slice(modinfo);
    out.extend_from_slice(shstrtab);
    out.resize(sh_off as usize, 0);
    let section = |out: &mut Vec<u8>, name: u32, kind: u32, off: u64, size: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // flags
        out.extend_from_slice(&0u64.to_le_bytes()); // addr
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // link
        out.extend_from_slice(&0u32.to_le_bytes()); // info
        out.extend_from_slice(&1u64.to_le_bytes()); // align
        out.extend_from_slice(&0u64.to_le_bytes()); // entsize
    };
    section(&mut out, 0, 0, 0, 0);
    section(&mut out, 1, 1, data_off, modinfo.len() as u64); // PROGBITS
    section(&mut out, 10, 3, shstr_off, shstrtab.len() as u64); // STRTAB
    out
}

#[test]
fn synthesized_module_reads_back() {
    let elf = synth_elf(
        b"name=tiny\0depends=a-b,c\0vermagic=6.1.0 SMP \0firmware=x/y.bin\0",
        183,
    );
    let info = ModInfo::parse(&elf).unwrap();
    assert_eq!(info.name(), Some("tiny"));
    assert_eq!(info.depends(), vec!["a-b", "c"]);
    assert_eq!(info.vermagic(), Some("6.1.0 SMP "));
    assert_eq!(info.firmware(), vec!["x/y.bin"]);
    assert_eq!(info.elf_machine(), 183);
}

fn key() -> impl Strategy<Value = String> {
    "[a-z_]{1,12}"
}

fn value() -> impl Strategy<Value = String> {
    // Anything but NUL; `=` and spaces included, trailing space included.
    proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..200)
        .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A synthesized .modinfo round-trips: every pair comes back in order, byte for byte.
    #[test]
    fn modinfo_round_trips(pairs in proptest::collection::vec((key(), value()), 0..20), machine in any::<u16>()) {
        let mut section = Vec::new();
        for (k, v) in &pairs {
            section.extend_from_slice(format!("{k}={v}").as_bytes());
            section.push(0);
        }
        let info = ModInfo::parse(&synth_elf(&section, machine)).unwrap();
        let back: Vec<(String, String)> = info.entries().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        prop_assert_eq!(back, pairs.clone());
        prop_assert_eq!(info.elf_machine(), machine);
        for (k, _) in &pairs {
            let all: Vec<&str> = pairs.iter().filter(|(k2, _)| k2 == k).map(|(_, v)| v.as_str()).collect();
            prop_assert_eq!(info.all(k), all);
        }
    }

    /// Arbitrary bytes, and corrupted real-looking ELF files, never panic the parser.
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                           flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..6)) {
        let _ = ModInfo::parse(&bytes);
        let mut elf = synth_elf(b"name=x\0depends=y\0", 62);
        for (at, v) in flips {
            let len = elf.len();
            elf[at % len] = v;
        }
        let _ = ModInfo::parse(&elf);
    }
}
