use std::fs;
use std::path::Path;
use std::process::Command;

use super::*;

/// `qemu-img create -q -f qcow2 [extra...] <path> [size]`.
fn create_qcow2(path: &Path, extra: &[&str], size: Option<&str>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .args(extra)
        .arg(path)
        .args(size);
    assert!(cmd.status().unwrap().success());
}

#[test]
fn qcow2_is_inspected_and_converted_sparse_and_grown() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    create_qcow2(&image, &[], Some("8M"));
    let info = inspect(&image).unwrap();
    assert_eq!(
        info,
        ImageInfo {
            format: "qcow2".into(),
            virtual_size: 8 << 20
        }
    );
    let target = dir.path().join("disk.img");
    convert_to_raw(&image, &info, &target, Some(16 << 20)).unwrap();
    let meta = fs::metadata(&target).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    // qemu-img allocates the first 4 KiB (its alignment probe); the rest stays a hole.
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) <= 8, "holes stay holes");
    let err = check_disk_size(&info, 4 << 20).unwrap_err().to_string();
    assert!(err.contains("pass --disk-size 1 or more"), "{err}");
}

#[test]
fn raw_without_partition_table_and_overlays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("page.html");
    fs::write(&text, "<html></html>").unwrap();
    let err = inspect(&text).unwrap_err().to_string();
    assert!(err.contains("is not a disk image"), "{err}");

    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    create_qcow2(&base, &[], Some("1M"));
    create_qcow2(&overlay, &["-F", "qcow2", "-b", base.to_str().unwrap()], None);
    let err = inspect(&overlay).unwrap_err().to_string();
    assert!(err.contains("is an overlay on"), "{err}");
}

#[test]
fn sha256_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, "abc").unwrap();
    check_sha256(
        &file,
        "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
    )
    .unwrap();
    let err = check_sha256(&file, &"0".repeat(64)).unwrap_err().to_string();
    assert!(err.starts_with("checksum mismatch for"), "{err}");
    assert!(check_sha256(&file, "xyz").is_err());
}
