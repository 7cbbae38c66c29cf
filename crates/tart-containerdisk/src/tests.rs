//! The tar rules on layers built here, in memory.

use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tar::{EntryType, Header};

use crate::{make_raw_disk, Compression, Extractor};

/// A raw disk: an MBR boot signature, data, a long run of zeros, data.
fn raw_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 8 << 20];
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk[4096..8192].fill(0xab);
    let end = disk.len();
    disk[end - 4096..].fill(0xcd);
    disk
}

enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// A tar stream as kubevirt/containerdisks writes one (owner 107:107), with names written
/// verbatim, `..` included (the tar crate's own setters refuse those).
fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = Header::new_gnu();
        header.set_uid(107);
        header.set_gid(107);
        header.set_mtime(0);
        let (name, kind, link, data): (&str, EntryType, Option<&str>, &[u8]) = match entry {
            Entry::File(name, data) => (name, EntryType::Regular, None, data),
            Entry::Dir(name) => (name, EntryType::Directory, None, &[]),
            Entry::Symlink(name, target) => (name, EntryType::Symlink, Some(target), &[]),
            Entry::HardLink(name, target) => (name, EntryType::Link, Some(target), &[]),
        };
        header.set_entry_type(kind);
        header.set_mode(if kind == EntryType::Directory { 0o555 } else { 0o444 });
        header.set_size(data.len() as u64);
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

/// Applies the layers and returns the chosen disk's path in the image and its bytes.
fn extract(staging: &Path, layers: &[(Vec<u8>, Compression)]) -> anyhow::Result<(String, Vec<u8>)> {
    let mut extractor = Extractor::new(staging)?;
    for (layer, compression) in layers {
        extractor.apply_layer(&mut Cursor::new(layer), *compression, None)?;
    }
    let (path, file) = extractor.into_disk(None)?;
    let bytes = fs::read(&file)?;
    Ok((path, bytes))
}

fn error(staging: &Path, layers: &[(Vec<u8>, Compression)]) -> String {
    format!("{:#}", extract(staging, layers).unwrap_err())
}

fn parts_left(staging: &Path) -> Vec<String> {
    fs::read_dir(staging)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn media_types() {
    for (media_type, compression) in [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression::Gzip),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression::Zstd),
        ("application/vnd.docker.image.rootfs.diff.tar", Compression::None),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression::Gzip),
    ] {
        assert_eq!(Compression::of_media_type(media_type), compression, "{media_type}");
    }
}

#[test]
fn the_disk_of_each_compression_and_name_form_is_found_and_written_sparsely() {
    let disk = raw_disk();
    for name in ["disk/disk.img", "./disk/disk.img", "/disk/disk.img"] {
        let layer = tar(&[
            Entry::Dir("disk/"),
            Entry::File(name, &disk),
            Entry::File("etc/os-release", b"x"),
        ]);
        for (bytes, compression) in [
            (layer.clone(), Compression::None),
            (gzip(&layer), Compression::Gzip),
            (zstd(&layer), Compression::Zstd),
            // Compressed data under a plain tar media type is recognised by its magic.
            (zstd(&layer), Compression::None),
        ] {
            let staging = tempfile::tempdir().unwrap();
            let (path, bytes) = extract(staging.path(), &[(bytes, compression)]).unwrap();
            assert_eq!(path, "disk/disk.img");
            assert!(bytes == disk, "{name} {compression:?}: the disk's bytes differ");
        }
    }
    let staging = tempfile::tempdir().unwrap();
    let layer = tar(&[Entry::File("disk/disk.img", &disk)]);
    let mut extractor = Extractor::new(staging.path()).unwrap();
    extractor
        .apply_layer(&mut Cursor::new(gzip(&layer)), Compression::Gzip, None)
        .unwrap();
    let (_, file) = extractor.into_disk(None).unwrap();
    let allocated = fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        allocated <= 16 << 10,
        "the zeros are holes: {allocated} bytes allocated for 12 KiB of data in 8 MiB"
    );
    make_raw_disk(staging.path(), "disk/disk.img", &file).unwrap();
    assert_eq!(fs::read(staging.path().join("disk.img")).unwrap(), disk);
    assert_eq!(parts_left(staging.path()), ["disk.img"]);
}

#[test]
fn no_disk_file() {
    let staging = tempfile::tempdir().unwrap();
    let layer = tar(&[
        Entry::Dir("disk/"),
        Entry::File("disks/x.img", b"x"),
        Entry::File("x.img", b"x"),
    ]);
    let err = error(staging.path(), &[(layer, Compression::None)]);
    assert!(err.contains("no file found in folder /disk, no disk present"), "{err}");
}

#[test]
fn several_disk_files_are_listed() {
    let staging = tempfile::tempdir().unwrap();
    let layer = tar(&[Entry::File("disk/a.qcow2", b"a"), Entry::File("disk/sub/b.img", b"b")]);
    let err = error(staging.path(), &[(layer, Compression::None)]);
    assert!(
        err.contains(
            "more than one file found in folder /disk, only one disk is allowed: /disk/a.qcow2, /disk/sub/b.img"
        ),
        "{err}"
    );
    assert!(parts_left(staging.path()).is_empty(), "candidates are removed");
}

#[test]
fn a_chosen_file_of_several_is_the_disk() {
    let layer = || tar(&[Entry::File("disk/a.qcow2", b"a"), Entry::File("disk/sub/b.img", b"b")]);
    let choose = |wanted: &str| {
        let staging = tempfile::tempdir().unwrap();
        let mut extractor = Extractor::new(staging.path()).unwrap();
        extractor
            .apply_layer(&mut Cursor::new(layer()), Compression::None, None)
            .unwrap();
        let chosen = crate::disk_file(wanted).and_then(|path| extractor.into_disk(Some(&path)));
        let chosen = chosen.map(|(path, file)| (path, fs::read(file).unwrap()));
        (chosen, parts_left(staging.path()).len())
    };
    let (chosen, left) = choose("/disk/sub/b.img");
    assert_eq!(chosen.unwrap(), ("disk/sub/b.img".to_owned(), b"b".to_vec()));
    assert_eq!(left, 1, "only the chosen file stays");
    let (chosen, left) = choose("./disk/c.img");
    let err = chosen.unwrap_err().to_string();
    assert!(
        err.contains("no disk file /disk/c.img; its files in /disk: /disk/a.qcow2, /disk/sub/b.img"),
        "{err}"
    );
    assert_eq!(left, 0);
    assert!(crate::disk_file("/etc/passwd").is_err());
    assert!(crate::disk_file("/disk/../etc/passwd").is_err());
    assert!(crate::disk_file("/disk/").is_err());
}

#[test]
fn later_layers_replace_and_white_out_earlier_files() {
    let disk = raw_disk();
    let staging = tempfile::tempdir().unwrap();
    let base = tar(&[
        Entry::File("disk/old.img", b"old"),
        Entry::File("disk/disk.img", b"stale"),
    ]);
    let top = tar(&[
        Entry::File("disk/.wh.old.img", b""),
        Entry::File("disk/disk.img", &disk),
    ]);
    let (path, bytes) = extract(staging.path(), &[(base, Compression::None), (top, Compression::None)]).unwrap();
    assert_eq!(path, "disk/disk.img");
    assert!(bytes == disk);

    let staging = tempfile::tempdir().unwrap();
    let base = tar(&[Entry::File("disk/a.img", b"a"), Entry::File("disk/b.img", b"b")]);
    let top = tar(&[Entry::File("disk/.wh..wh..opq", b""), Entry::File("disk/c.img", &disk)]);
    let (path, _) = extract(
        staging.path(),
        &[(gzip(&base), Compression::Gzip), (top, Compression::None)],
    )
    .unwrap();
    assert_eq!(
        path, "disk/c.img",
        "the opaque whiteout hides the lower layer's files, not its own layer's"
    );

    // A directory in a later layer merges with the one below.
    let staging = tempfile::tempdir().unwrap();
    let base = tar(&[
        Entry::Dir("disk/"),
        Entry::Dir("disk/sub/"),
        Entry::File("disk/sub/a.img", &disk),
    ]);
    let top = tar(&[Entry::Dir("disk/"), Entry::Dir("disk/sub/"), Entry::File("etc/x", b"x")]);
    let (path, _) = extract(staging.path(), &[(base, Compression::None), (top, Compression::None)]).unwrap();
    assert_eq!(path, "disk/sub/a.img");

    let staging = tempfile::tempdir().unwrap();
    let base = tar(&[Entry::File("disk/a.img", b"a")]);
    let top = tar(&[Entry::File(".wh.disk", b"")]);
    let err = error(staging.path(), &[(base, Compression::None), (top, Compression::None)]);
    assert!(err.contains("no file found in folder /disk"), "{err}");
}

#[test]
fn links_inside_disk_name_the_same_file() {
    let disk = raw_disk();
    let staging = tempfile::tempdir().unwrap();
    let layer = tar(&[
        Entry::File("disk/real.img", &disk),
        Entry::Symlink("disk/disk.img", "real.img"),
        Entry::HardLink("disk/hard.img", "disk/real.img"),
    ]);
    let (_, bytes) = extract(staging.path(), &[(layer, Compression::None)]).unwrap();
    assert!(bytes == disk);

    let staging = tempfile::tempdir().unwrap();
    let layer = tar(&[
        Entry::File("images/real.img", &disk),
        Entry::Symlink("disk/disk.img", "/images/real.img"),
    ]);
    let err = error(staging.path(), &[(layer, Compression::None)]);
    assert!(
        err.contains("/disk/disk.img is a symlink to /images/real.img, outside /disk, which tart does not read"),
        "{err}"
    );
}

#[test]
fn escapes_from_the_root_are_refused() {
    for (entries, expected) in [
        (vec![Entry::File("../evil", b"x")], "\"../evil\" has a \"..\" component"),
        (vec![Entry::File("disk/../../evil", b"x")], "escaping the image root"),
        (
            vec![Entry::Symlink("disk/disk.img", "../../etc/shadow")],
            "/disk/disk.img links to \"../../etc/shadow\", outside the image root",
        ),
        (
            vec![Entry::Symlink("usr/lib/x", "../../../../x")],
            "/usr/lib/x links to \"../../../../x\", outside the image root",
        ),
        (
            vec![Entry::HardLink("disk/disk.img", "../etc/shadow")],
            "/disk/disk.img links to \"../etc/shadow\", outside the image root",
        ),
    ] {
        let staging = tempfile::tempdir().unwrap();
        let err = error(staging.path(), &[(tar(&entries), Compression::None)]);
        assert!(err.contains(expected), "{err}");
        assert!(parts_left(staging.path()).is_empty());
    }
}

#[test]
fn a_layer_decompressing_past_its_bound_is_stopped_there() {
    let staging = tempfile::tempdir().unwrap();
    let mut extractor = Extractor::new(staging.path()).unwrap();
    extractor.allowance = 1 << 20;
    // 64 MiB of zeros outside /disk: a few KiB compressed.
    let layer = zstd(&tar(&[Entry::File("filler", &vec![0u8; 64 << 20])]));
    assert!(layer.len() < 64 << 10);
    let mut reader = Cursor::new(&layer);
    let err = format!(
        "{:#}",
        extractor.apply_layer(&mut reader, Compression::Zstd, None).unwrap_err()
    );
    assert!(err.contains("decompresses to more than 1048576 bytes"), "{err}");

    // The disk file's own stated size raises the bound by exactly that much.
    let staging = tempfile::tempdir().unwrap();
    let disk = raw_disk();
    let mut extractor = Extractor::new(staging.path()).unwrap();
    extractor.allowance = 64 << 10;
    let layer = zstd(&tar(&[Entry::File("disk/disk.img", &disk)]));
    extractor
        .apply_layer(&mut Cursor::new(&layer), Compression::Zstd, None)
        .unwrap();
}

/// A qcow2 version 3 header: `virtual_size`, and a backing file name when given.
fn qcow2_header(virtual_size: u64, backing: Option<&str>) -> Vec<u8> {
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    if let Some(backing) = backing {
        header[8..16].copy_from_slice(&256u64.to_be_bytes());
        header[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        header[256..256 + backing.len()].copy_from_slice(backing.as_bytes());
    }
    header[20..24].copy_from_slice(&16u32.to_be_bytes());
    header[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    header
}

#[test]
fn qcow2_with_a_backing_file_is_refused_at_its_header() {
    let staging = tempfile::tempdir().unwrap();
    let mut file = qcow2_header(1 << 30, Some("/etc/shadow"));
    file.resize(4 << 20, 0);
    let err = error(
        staging.path(),
        &[(tar(&[Entry::File("disk/disk.img", &file)]), Compression::None)],
    );
    assert!(
        err.contains("/disk/disk.img is a qcow2 overlay on a backing file (/etc/shadow)"),
        "{err}"
    );
}

#[test]
fn qcow2_larger_than_its_disk_is_refused_at_its_header() {
    let staging = tempfile::tempdir().unwrap();
    let mut file = qcow2_header(1 << 20, None);
    file.resize(128 << 20, 0);
    let err = error(
        staging.path(),
        &[(zstd(&tar(&[Entry::File("disk/disk.img", &file)])), Compression::Zstd)],
    );
    assert!(
        err.contains("far more than a qcow2 file for its 1048576-byte disk can be"),
        "{err}"
    );
}

#[test]
fn corrupt_compressed_data() {
    let layer = tar(&[Entry::File("disk/disk.img", &raw_disk())]);
    let mut gz = gzip(&layer);
    let middle = gz.len() / 2;
    gz[20..middle].iter_mut().for_each(|byte| *byte = !*byte);
    let mut zst = zstd(&layer);
    let middle = zst.len() / 2;
    zst[8..middle].iter_mut().for_each(|byte| *byte = !*byte);
    for (layer, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let staging = tempfile::tempdir().unwrap();
        let err = error(staging.path(), &[(layer, compression)]);
        assert!(err.contains("corrupt or truncated"), "{compression:?}: {err}");
    }
    let staging = tempfile::tempdir().unwrap();
    let err = error(staging.path(), &[(layer, Compression::Gzip)]);
    assert!(
        err.contains("its media type says gzip, but the data is not gzip data"),
        "{err}"
    );
}

#[test]
fn the_uncompressed_content_is_checked_against_its_diff_id() {
    let layer = tar(&[Entry::File("disk/disk.img", &raw_disk())]);
    let diff_id = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&layer));
    let staging = tempfile::tempdir().unwrap();
    let mut extractor = Extractor::new(staging.path()).unwrap();
    extractor
        .apply_layer(&mut Cursor::new(zstd(&layer)), Compression::Zstd, Some(&diff_id))
        .unwrap();

    let mut changed = layer.clone();
    let at = 512 + 4096;
    changed[at] ^= 1;
    let mut extractor = Extractor::new(staging.path()).unwrap();
    let err = extractor
        .apply_layer(&mut Cursor::new(zstd(&changed)), Compression::Zstd, Some(&diff_id))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("but the image config says {diff_id} (rootfs.diff_ids)")),
        "{err:#}"
    );
}

#[test]
fn the_disk_is_checked_against_the_shasum_label() {
    use sha2::Digest;
    let disk = raw_disk();
    let base = tar(&[Entry::File("disk/other.img", b"x")]);
    let top = tar(&[
        Entry::File("disk/.wh.other.img", b""),
        Entry::File("disk/disk.img", &disk),
    ]);
    let sha256 = format!("{:x}", sha2::Sha256::digest(&disk));
    let sha512 = format!("{:x}", sha2::Sha512::digest(&disk));
    let wrong = format!("{:x}", sha2::Sha512::digest(b"another disk"));
    for (label, fine) in [
        (sha256.as_str(), true),
        (sha512.as_str(), true),
        (wrong.as_str(), false),
        ("not-a-checksum", true),
    ] {
        let staging = tempfile::tempdir().unwrap();
        let mut extractor = Extractor::new(staging.path()).unwrap();
        extractor.check_shasum(Some(label));
        for layer in [&base, &top] {
            extractor
                .apply_layer(&mut Cursor::new(layer), Compression::None, None)
                .unwrap();
        }
        match extractor.into_disk(None) {
            Ok(_) => assert!(fine, "{label} accepted"),
            Err(err) => {
                assert!(!fine, "{label}: {err:#}");
                let err = format!("{err:#}");
                assert!(
                    err.contains(&format!(
                        "/disk/disk.img has checksum {sha512}, but the image's shasum label says {wrong}"
                    )),
                    "{err}"
                );
                assert!(parts_left(staging.path()).is_empty());
            }
        }
    }
}
