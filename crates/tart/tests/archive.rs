//! `tart export` / `tart import`: `.tvm` archives (Apple Archive in LZFSE blocks, as macOS Tart).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use apple_archive::{ArchiveWriter, EntryType, Header, Key, PbzeWriter, Value};

mod common;
use common::{fails_with, wait_for, Home};
use tart_testkit::measured;

fn vm_dir(home: &Home, name: &str) -> PathBuf {
    home.dir.path().join("home/vms").join(name)
}

fn vm_names(home: &Home) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(home.dir.path().join("home/vms"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn tmp_entries(home: &Home) -> Vec<String> {
    fs::read_dir(home.dir.path().join("home/tmp"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The data regions (SEEK_DATA/SEEK_HOLE) of a file: everything else reads as zeros.
fn data_regions(file: &File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().unwrap().len() as i64;
    let (mut regions, mut offset) = (Vec::new(), 0i64);
    while offset < len {
        // SAFETY: lseek on a descriptor we own.
        let start = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
        regions.push((start as u64, end as u64));
        offset = end;
    }
    regions
}

/// Whether two files read the same: compares the union of their data regions, since both
/// read zeros everywhere else.
fn same_contents(a: &Path, b: &Path) -> bool {
    let (a, b) = (File::open(a).unwrap(), File::open(b).unwrap());
    if a.metadata().unwrap().len() != b.metadata().unwrap().len() {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut regions = [data_regions(&a), data_regions(&b)].concat();
    regions.sort();
    regions.into_iter().all(|(start, end)| {
        let mut offset = start;
        while offset < end {
            let n = ((end - offset) as usize).min(x.len());
            a.read_exact_at(&mut x[..n], offset).unwrap();
            b.read_exact_at(&mut y[..n], offset).unwrap();
            if x[..n] != y[..n] {
                return false;
            }
            offset += n as u64;
        }
        true
    })
}

#[test]
fn twenty_gb_sparse_disk_round_trips() {
    let home = Home::empty();
    home.ok(&["create", "--linux", "--disk-size", "20", "src"]);
    let disk = vm_dir(&home, "src").join("disk.img");
    {
        // Scattered data: random and text regions, unaligned, across the whole disk, and a
        // written all-zero region that must come back as a hole.
        let file = OpenOptions::new().write(true).open(&disk).unwrap();
        for i in 0..24u64 {
            let offset = i * 830_000_000 + i * 4097;
            let data = if i % 2 == 0 {
                pseudo_random(3 << 20, i)
            } else {
                b"tart export ".repeat(300_000)
            };
            file.write_all_at(&data, offset).unwrap();
        }
        file.write_all_at(&vec![0; 16 << 20], 5_000_000_000).unwrap();
        file.sync_all().unwrap();
    }
    let tvm = home.dir.path().join("src.tvm");
    let out = home.ok(&["export", "src", home.dir.path().join("first.tvm").to_str().unwrap()]);
    assert!(out.starts_with("exporting...\n"), "{out}");
    let (export_time, export_rss) = measured(home.tart().args(["export", "src", tvm.to_str().unwrap()]));
    let mut magic = [0u8; 4];
    File::open(&tvm).unwrap().read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"pbze");
    let archive_size = fs::metadata(&tvm).unwrap().len();
    assert!(archive_size < 80 << 20, "{archive_size} bytes for 76 MiB of data");

    let (import_time, import_rss) = measured(home.tart().args(["import", tvm.to_str().unwrap(), "copy"]));
    eprintln!(
        "export {export_time:?} (peak RSS {} MiB), import {import_time:?} (peak RSS {} MiB), archive {archive_size} bytes",
        export_rss >> 20,
        import_rss >> 20
    );
    // Memory stays bounded whatever the disk size: a few blocks in flight per core.
    assert!(
        export_rss < 256 << 20 && import_rss < 256 << 20,
        "{export_rss} / {import_rss}"
    );
    let out = home.ok(&["import", home.dir.path().join("first.tvm").to_str().unwrap(), "other"]);
    assert!(out.starts_with("importing...\n"), "{out}");
    home.ok(&["delete", "other"]);

    let (src, copy) = (vm_dir(&home, "src"), vm_dir(&home, "copy"));
    assert!(same_contents(&src.join("disk.img"), &copy.join("disk.img")));
    assert!(same_contents(&src.join("nvram.bin"), &copy.join("nvram.bin")));
    let config = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(vm_dir(&home, name).join("config.json")).unwrap()).unwrap()
    };
    let (source_config, copy_config) = (config("src"), config("copy"));
    let source_mac = source_config["macAddress"].clone();
    assert_ne!(copy_config["macAddress"], source_mac, "src has that MAC: a new one");
    let mut expected = source_config;
    expected["macAddress"] = copy_config["macAddress"].clone();
    assert_eq!(copy_config, expected);
    let allocated = |path: &Path| fs::metadata(path).unwrap().blocks() * 512;
    let (source_alloc, copy_alloc) = (allocated(&src.join("disk.img")), allocated(&copy.join("disk.img")));
    assert!(
        copy_alloc <= source_alloc,
        "the import is at most as allocated as the source: {copy_alloc} vs {source_alloc}"
    );
    assert!(copy_alloc >= 70 << 20, "{copy_alloc}");

    // Importing over an existing VM needs --force; once no other VM has the archived MAC
    // address, the import keeps it.
    fails_with(
        home.tart().args(["import", tvm.to_str().unwrap(), "copy"]),
        1,
        "already exists",
    );
    home.ok(&["delete", "src", "copy"]);
    home.ok(&["import", tvm.to_str().unwrap(), "copy", "--force"]);
    assert_eq!(config("copy")["macAddress"], source_mac);
    assert!(tmp_entries(&home).is_empty());
}

#[test]
fn a_running_vm_exports_and_its_import_boots() {
    let home = Home::with_guest();
    let run = home.run(1);
    wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    assert!(vm_dir(&home, "guest").join("control.sock").exists());
    let tvm = home.dir.path().join("running.tvm");
    home.ok(&["export", "guest", tvm.to_str().unwrap()]);
    common::stop(&home, "guest", run);

    home.ok(&["import", tvm.to_str().unwrap(), "imported"]);
    assert!(
        !vm_dir(&home, "imported").join("control.sock").exists(),
        "sockets are not archived"
    );
    let run = home.run_vm("imported", 2, &[]);
    wait_for(&home.serial(2), "TART-TEST-GUEST: booted");
    common::stop(&home, "imported", run);
}

#[test]
fn default_path_is_asked_about_or_refused() {
    let home = Home::empty();
    home.ok(&["create", "--linux", "--disk-size", "1", "vm"]);
    let cwd = tempfile::tempdir().unwrap();
    let export = |home: &Home| {
        let mut cmd = home.tart();
        cmd.current_dir(cwd.path()).args(["export", "vm"]);
        cmd
    };
    assert!(export(&home).status().unwrap().success());
    let default = cwd.path().join("vm.tvm");
    assert!(default.is_file());
    fs::write(&default, b"precious").unwrap();
    // No terminal to ask on (CI, scripts): refused, the file kept.
    fails_with(
        export(&home).stdin(std::process::Stdio::null()),
        1,
        "vm.tvm already exists; give the path explicitly",
    );
    assert_eq!(fs::read(&default).unwrap(), b"precious");
    // An explicit path is replaced without asking.
    home.ok(&["export", "vm", default.to_str().unwrap()]);
    assert_ne!(fs::read(&default).unwrap(), b"precious");
}

#[test]
fn a_killed_export_leaves_no_archive() {
    let home = Home::empty();
    home.ok(&["create", "--linux", "--disk-size", "2", "vm"]);
    let disk = vm_dir(&home, "vm").join("disk.img");
    // Random letters: compressible (so not stored after the probe) yet slow for LZFSE, which
    // finds no matches in them: the export can be caught halfway.
    let letters: Vec<u8> = pseudo_random(64 << 20, 5).iter().map(|b| b'a' + b % 26).collect();
    let file = OpenOptions::new().write(true).open(&disk).unwrap();
    for i in 0..8u64 {
        file.write_all_at(&letters, i * letters.len() as u64).unwrap();
    }
    let out_dir = tempfile::tempdir().unwrap();
    let tvm = out_dir.path().join("vm.tvm");
    let mut export = home
        .tart()
        .args(["export", "vm", tvm.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Progress lines (CI is set): kill once the export is under way but not done.
    let stdout = std::io::BufReader::new(export.stdout.take().unwrap());
    let progress = std::io::BufRead::lines(stdout)
        .map(Result::unwrap)
        .find(|line| line.ends_with('%') && line != "0%")
        .unwrap();
    assert_ne!(
        progress, "100%",
        "the export finished before it could be killed: make the disk larger"
    );
    export.kill().unwrap();
    export.wait().unwrap();
    let left: Vec<_> = fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a killed export leaves nothing: {left:?}");
}

/// An archive made of `entries` (header, data), as a hostile or broken producer would write it.
fn craft(path: &Path, entries: &[(Header, &[u8])]) {
    let mut writer = ArchiveWriter::new(PbzeWriter::new(File::create(path).unwrap()).unwrap());
    for (header, data) in entries {
        writer.write_header(header).unwrap();
        writer.write_data(data).unwrap();
    }
    writer.finish().unwrap().finish().unwrap();
}

fn file_entry(path: &str, data: &[u8]) -> Header {
    Header::new()
        .with(Key::TYP, Value::Uint(u64::from(EntryType::File.letter())))
        .with(Key::PAT, Value::String(path.as_bytes().to_vec()))
        .with(Key::DAT, Value::Blob(data.len() as u64))
}

fn symlink_entry(path: &str, target: &str) -> Header {
    Header::new()
        .with(Key::TYP, Value::Uint(u64::from(EntryType::Symlink.letter())))
        .with(Key::PAT, Value::String(path.as_bytes().to_vec()))
        .with(Key::LNK, Value::String(target.as_bytes().to_vec()))
}

#[test]
fn bad_archives_get_one_clear_line_and_leave_nothing() {
    let home = Home::empty();
    home.ok(&["create", "--linux", "--disk-size", "1", "vm"]);
    let dir = home.dir.path();
    let good = dir.join("good.tvm");
    home.ok(&["export", "vm", good.to_str().unwrap()]);
    let config = fs::read(vm_dir(&home, "vm").join("config.json")).unwrap();

    let not_archive = dir.join("notes.txt");
    fs::write(&not_archive, "just some text\n").unwrap();
    let truncated = dir.join("truncated.tvm");
    let bytes = fs::read(&good).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let absolute = dir.join("absolute.tvm");
    craft(&absolute, &[(file_entry("/tmp/evil", b"x"), b"x")]);
    let dotdot = dir.join("dotdot.tvm");
    craft(
        &dotdot,
        &[
            (file_entry("config.json", &config), &config),
            (file_entry("../evil", b"x"), b"x"),
        ],
    );
    let symlink = dir.join("symlink.tvm");
    craft(&symlink, &[(symlink_entry("disk.img", "/etc/passwd"), b"")]);
    let escaping = dir.join("escaping.tvm");
    craft(&escaping, &[(symlink_entry("nvram.bin", "../../other/nvram.bin"), b"")]);
    let no_config = dir.join("no-config.tvm");
    craft(&no_config, &[(file_entry("disk.img", b"disk"), b"disk")]);
    let no_disk = dir.join("no-disk.tvm");
    craft(&no_disk, &[(file_entry("config.json", &config), &config)]);
    let bomb = dir.join("bomb.tvm");
    let mut bomb_bytes = b"pbze".to_vec();
    bomb_bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
    fs::write(&bomb, bomb_bytes).unwrap();
    let apple_made = Path::new(env!("CARGO_MANIFEST_DIR")).join("../apple-archive/tests/data/sparkle-test-app.aar");

    for (archive, needle) in [
        (&not_archive, "not an Apple Archive"),
        (&truncated, "truncated"),
        (&absolute, "has an absolute path"),
        (&dotdot, "leads out of the VM directory"),
        (&symlink, "points outside the VM directory"),
        (&escaping, "points outside the VM directory"),
        (&no_config, "it has no config.json, so it is not a Tart VM"),
        (&no_disk, "it has no disk.img, so it is not a Tart VM"),
        (&bomb, "blocks of 4611686018427387904 bytes"),
        (&apple_made, "it has no config.json"),
        (&dir.join("missing.tvm"), "failed to open"),
    ] {
        let stderr = fails_with(
            home.tart().args(["import", archive.to_str().unwrap(), "new"]),
            1,
            needle,
        );
        assert_eq!(stderr.lines().count(), 1, "{}: {stderr}", archive.display());
        assert_eq!(vm_names(&home), ["vm"], "{}", archive.display());
        home.ok(&["list"]);
        assert!(tmp_entries(&home).is_empty(), "{}", archive.display());
    }
    assert!(!Path::new("/tmp/evil").exists() && !dir.join("home/evil").exists());

    fails_with(
        home.tart().args(["import", good.to_str().unwrap(), "a/b"]),
        64,
        "<name> should be a local name",
    );
    fails_with(home.tart().args(["export", "nope"]), 2, "does not exist");
}

#[test]
fn full_disk_during_import_fails_cleanly() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let dir = tempfile::tempdir().unwrap();
    let tart = assert_cmd::cargo::cargo_bin("tart");
    // The archive (40 MiB of random data, incompressible) lives outside a 64 MiB tmpfs that
    // holds the source VM but not a second copy.
    let script = r#"
        set -e
        mount -t tmpfs -o size=64m tart-test "$1/mnt"
        export TART_HOME="$1/mnt/home"
        "$2" create --linux --disk-size 1 src
        dd if=/dev/urandom of="$TART_HOME/vms/src/disk.img" bs=1M count=40 conv=notrunc status=none
        "$2" export src "$1/src.tvm" >/dev/null
        set +e
        "$2" import "$1/src.tvm" dst >/dev/null
        echo "import-exit=$?"
        set -e
        ls "$TART_HOME/vms"
        "$2" list >/dev/null
        echo "tmp-entries=$(ls -A "$TART_HOME/tmp" | wc -l)"
    "#;
    fs::create_dir(dir.path().join("mnt")).unwrap();
    let (stdout, stderr) = tart_testkit::in_private_mounts(script, &[dir.path().as_os_str(), tart.as_os_str()]);
    assert!(stdout.contains("import-exit=1"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stdout.contains("src\ntmp-entries=0"), "{stdout}");
}
