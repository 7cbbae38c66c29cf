//! KubeVirt containerDisks (`../shared/spec/containerdisk.md`): container images built here as
//! kubevirt/containerdisks and podman build them (a tar layer with the disk at `/disk/…`, owned
//! by 107:107; gzip or zstd; Docker v2 or OCI manifests), pushed to a real docker-registry,
//! pulled by `tart clone` and booted by QEMU.
//!
//! The disk is the test guest's (`scripts/guest/build-test-guest`), as qcow2 (converted by
//! qemu-img here) or raw. Booting under TCG is slow, so one image boots to the guest's marker
//! and the others are checked to have exactly the test guest's disk.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use tart_testkit::{sha256_digest, FaultProxy, Registry};

mod oci_common;
use oci_common::{assert_same_file, boot_test_guest, Home};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Manifest {
    Docker,
    Oci,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self, manifest: Manifest) -> &'static str {
        match (manifest, self) {
            (Manifest::Oci, Compression::Plain) => "application/vnd.oci.image.layer.v1.tar",
            (Manifest::Oci, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Manifest::Oci, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Manifest::Docker, Compression::Plain) => "application/vnd.docker.image.rootfs.diff.tar",
            (Manifest::Docker, Compression::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            (Manifest::Docker, Compression::Zstd) => unreachable!("Docker v2 has no zstd layers"),
        }
    }

    fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Compression::Plain => tar.to_vec(),
            Compression::Gzip => {
                // Go's gzip.BestSpeed, as kubevirt/containerdisks writes its layers.
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(tar).unwrap();
                encoder.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
        }
    }
}

/// A tar entry: what is in the image at `name`.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(107);
    header.set_gid(107);
    header.set_username("qemu").unwrap();
    header.set_groupname("qemu").unwrap();
    header.set_mtime(1_700_000_000);
    header
}

/// Names and link targets go in verbatim (`..` too, which the tar crate's setters refuse).
fn set_names(header: &mut tar::Header, name: &str, link: Option<&str>) {
    let old = header.as_old_mut();
    old.name = [0; 100];
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_cksum();
}

/// A layer's tar stream, as kubevirt/containerdisks writes it: `disk/` 0555 and files 0444,
/// owned by 107:107 (`qemu`).
fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (name, link, mut header, data): (&str, Option<&str>, tar::Header, &[u8]) = match entry {
            Entry::Dir(name) => (name, None, header(tar::EntryType::Directory, 0o555, 0), &[]),
            Entry::File(name, data) => (
                name,
                None,
                header(tar::EntryType::Regular, 0o444, data.len() as u64),
                data,
            ),
            Entry::Symlink(name, target) => (name, Some(target), header(tar::EntryType::Symlink, 0o777, 0), &[]),
            Entry::HardLink(name, target) => (name, Some(target), header(tar::EntryType::Link, 0o444, 0), &[]),
        };
        set_names(&mut header, name, link);
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Pushes an image of `layers` (tar streams, compressed as asked) and returns the digest of
/// each layer blob as pushed.
fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    manifest: Manifest,
    compression: Compression,
    layers: &[Vec<u8>],
    shasum: Option<&str>,
) -> Vec<String> {
    let blobs: Vec<Vec<u8>> = layers.iter().map(|tar| compression.compress(tar)).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["no-entrypoint"],
            "Env": ["INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora"],
            "Labels": shasum.map(|shasum| json!({"shasum": shasum})),
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|tar| sha256_digest(tar)).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (manifest_type, config_type) = match manifest {
        Manifest::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
        Manifest::Oci => (OCI_MANIFEST, OCI_CONFIG),
    };
    let descriptor = |media_type: &str, data: &[u8]| json!({"mediaType": media_type, "size": data.len(), "digest": registry.push_blob(repo, data)});
    let layer_descriptors: Vec<Value> = blobs
        .iter()
        .map(|blob| descriptor(compression.media_type(manifest), blob))
        .collect();
    let manifest_json = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": descriptor(config_type, &config),
        "layers": layer_descriptors,
    });
    registry.push_manifest(repo, tag, manifest_type, &serde_json::to_vec(&manifest_json).unwrap());
    blobs.iter().map(|blob| sha256_digest(blob)).collect()
}

/// The test guest's disk as qcow2, converted by qemu-img into `dir`.
fn qcow2_of(image: &Path, dir: &Path) -> Vec<u8> {
    let target = dir.join("guest.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", path(image), path(&target)]);
    fs::read(target).unwrap()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// What the `shasum` label holds: lowercase hex, no algorithm prefix.
fn sha256_hex(data: &[u8]) -> String {
    sha256_digest(data).trim_start_matches("sha256:").to_owned()
}

fn assert_sparse(disk: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(disk).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "{} is not sparse: {} of {} bytes allocated",
        disk.display(),
        meta.blocks() * 512,
        meta.len()
    );
}

#[test]
fn containerdisks_of_each_kind_clone_to_the_guests_disk_and_boot() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let guest = tart_testkit::test_guest_image();
    let work = tempfile::tempdir().unwrap();
    let qcow2 = qcow2_of(guest, work.path());
    let raw = fs::read(guest).unwrap();
    let kubevirt_layer = tar(&[Entry::Dir("disk/"), Entry::File("disk/disk.qcow2", &qcow2)]);

    // What kubevirt/containerdisks publishes: Docker v2, one gzip layer, a qcow2 disk.
    push_image(
        &registry,
        "containerdisks/guest",
        "docker-gzip",
        Manifest::Docker,
        Compression::Gzip,
        std::slice::from_ref(&kubevirt_layer),
        Some(&sha256_hex(&qcow2)),
    );
    // podman push --compression-format zstd of the same.
    push_image(
        &registry,
        "containerdisks/guest",
        "oci-zstd",
        Manifest::Oci,
        Compression::Zstd,
        std::slice::from_ref(&kubevirt_layer),
        None,
    );
    push_image(
        &registry,
        "containerdisks/guest",
        "oci-gzip",
        Manifest::Oci,
        Compression::Gzip,
        &[kubevirt_layer],
        None,
    );
    // A Dockerfile `FROM base` + `ADD --chown=107:107 disk.img /disk/`: files outside /disk in a
    // first layer, a disk named disk.img that is raw, and a stale disk the second layer deletes.
    let base = tar(&[
        Entry::Dir("etc/"),
        Entry::File("etc/os-release", b"ID=base\n"),
        Entry::File("./disk/old.qcow2", &qcow2[..4096]),
    ]);
    let top = tar(&[
        Entry::File("./disk/.wh.old.qcow2", b""),
        Entry::File("/disk/disk.img", &raw),
    ]);
    push_image(
        &registry,
        "containerdisks/guest",
        "docker-raw-two-layers",
        Manifest::Docker,
        Compression::Plain,
        &[base, top],
        None,
    );

    let home = Home::new();
    for tag in ["docker-gzip", "oci-zstd", "oci-gzip", "docker-raw-two-layers"] {
        let started = std::time::Instant::now();
        let out = home.ok(&[
            "clone",
            "--insecure",
            &format!("{host}/containerdisks/guest:{tag}"),
            tag,
        ]);
        eprintln!("clone {tag}: {:?}", started.elapsed());
        assert!(out.stdout.contains("pulling containerDisk ("), "{}", out.stdout);
        assert_same_file(&home.disk(tag), guest);
        assert_sparse(&home.disk(tag));
        // No login without a seed: the clone has tart's default one, under its own name.
        let meta_data = fs::read_to_string(home.vm(tag).join("cloud-init/meta-data")).unwrap();
        assert!(meta_data.contains(&format!("local-hostname: \"{tag}\"")), "{meta_data}");
        let user_data = fs::read_to_string(home.vm(tag).join("cloud-init/user-data")).unwrap();
        assert!(user_data.contains("name: admin"), "{user_data}");
        let config: Value = serde_json::from_slice(&fs::read(home.vm(tag).join("config.json")).unwrap()).unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["arch"], "amd64");
    }
    // Nothing of the extraction is left in the cached images, and no staging in tmp/.
    for entry in home.cache_entries() {
        let Ok(files) = fs::read_dir(&entry) else { continue };
        for file in files {
            let name = file.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with("containerdisk-"),
                "{name} left in {}",
                entry.display()
            );
        }
    }
    let tmp: Vec<_> = fs::read_dir(home.root.join("tmp"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "tmp/ is not empty: {tmp:?}");

    let list = home.ok(&["list", "--source", "oci", "--format", "json"]).stdout;
    let list: Value = serde_json::from_str(&list).unwrap();
    let formats: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Format"].as_str().unwrap_or("?"))
        .collect();
    assert!(formats.iter().all(|f| *f == "containerdisk"), "{list}");

    // The kubevirt/containerdisks shape boots, with UEFI and its cloud-init seed attached.
    home.ok(&["set", "docker-gzip", "--cpu", "1", "--memory", "512"]);
    boot_test_guest(&home, "docker-gzip");
}

/// A 1 MiB raw disk whose only code is an x86 boot sector (no partition table, so no EFI
/// system partition): in 16-bit real mode it writes the test guest's marker to COM1 and halts.
fn bios_only_disk() -> Vec<u8> {
    const MARKER: &[u8] = b"TART-TEST-GUEST: booted\r\n\0";
    #[rustfmt::skip]
    let code: [u8; 23] = [
        0xfa,             // cli
        0xfc,             // cld
        0x31, 0xc0,       // xor ax, ax
        0x8e, 0xd8,       // mov ds, ax
        0xbe, 0x17, 0x7c, // mov si, 0x7c17 (the marker, right after this code)
        0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1)
        0xac,             // next: lodsb
        0x84, 0xc0,       //   test al, al
        0x74, 0x03,       //   jz done
        0xee,             //   out dx, al
        0xeb, 0xf8,       //   jmp next
        0xf4,             // done: hlt
        0xeb, 0xfd,       //   jmp done
    ];
    let mut disk = vec![0u8; 1 << 20];
    disk[..code.len()].copy_from_slice(&code);
    disk[code.len()..code.len() + MARKER.len()].copy_from_slice(MARKER);
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    disk
}

/// KubeVirt boots amd64 containerDisks with BIOS by default: a disk that has a boot loader in
/// its MBR and no EFI system partition boots that way here too.
#[test]
fn a_containerdisk_with_only_a_bios_boot_loader_boots_with_bios() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let disk = bios_only_disk();
    let layer = tar(&[Entry::Dir("disk/"), Entry::File("disk/disk.img", &disk)]);
    push_image(
        &registry,
        "containerdisks/bios",
        "v1",
        Manifest::Docker,
        Compression::Gzip,
        &[layer],
        None,
    );

    let home = Home::new();
    let out = home.ok(&["clone", "--insecure", &format!("{host}/containerdisks/bios:v1"), "bios"]);
    assert!(out.stdout.contains("boots with BIOS"), "{}{}", out.stdout, out.stderr);
    let config: Value = serde_json::from_slice(&fs::read(home.vm("bios").join("config.json")).unwrap()).unwrap();
    assert_eq!(config["bootFirmware"], "bios", "{config}");
    home.ok(&["set", "bios", "--cpu", "1", "--memory", "256"]);
    boot_test_guest(&home, "bios");
}

/// Several files in /disk: KubeVirt refuses such an image unless its `containerDisk.path` names
/// one, and so does tart unless `--containerdisk-path` does.
#[test]
fn one_of_several_disk_files_is_chosen_with_containerdisk_path() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let bios = bios_only_disk();
    let other = vec![7u8; 1 << 20];
    let layer = tar(&[
        Entry::Dir("disk/"),
        Entry::File("disk/data.img", &other),
        Entry::File("disk/boot.img", &bios),
    ]);
    push_image(
        &registry,
        "containerdisks/two",
        "v1",
        Manifest::Oci,
        Compression::Zstd,
        &[layer],
        None,
    );
    let name = format!("{host}/containerdisks/two:v1");

    let home = Home::new();
    let out = home.fail(&["clone", "--insecure", &name, "vm"]);
    assert!(
        out.stderr
            .contains("/disk/boot.img, /disk/data.img (choose one with --containerdisk-path)"),
        "{}",
        out.stderr
    );
    let out = home.fail(&[
        "clone",
        "--insecure",
        &name,
        "vm",
        "--containerdisk-path",
        "/disk/none.img",
    ]);
    assert!(
        out.stderr.contains("the image has no disk file /disk/none.img"),
        "{}",
        out.stderr
    );
    assert!(home.cache_entries().is_empty(), "{:?}", home.cache_entries());

    home.ok(&[
        "clone",
        "--insecure",
        &name,
        "vm",
        "--containerdisk-path=./disk/boot.img",
    ]);
    assert_eq!(fs::read(home.vm("vm").join("disk.img")).unwrap(), bios);
    home.ok(&["set", "vm", "--cpu", "1", "--memory", "256"]);
    boot_test_guest(&home, "vm");

    // The cache holds one VM per image: the other file needs the cached one deleted first.
    let out = home.fail(&["pull", "--insecure", &name, "--containerdisk-path", "/disk/data.img"]);
    assert!(
        out.stderr
            .contains("is cached with /disk/boot.img as its disk; to use /disk/data.img, delete it first"),
        "{}",
        out.stderr
    );
    home.ok(&["pull", "--insecure", &name, "--containerdisk-path", "/disk/boot.img"]);
}

// ---------------------------------------------------------------------------------------------
// Bad input: one line each, nothing cached, no VM
// ---------------------------------------------------------------------------------------------

fn refused(home: &Home, host: &str, tag: &str, expected: &str) {
    let out = home.fail(&["clone", "--insecure", &format!("{host}/bad/disk:{tag}"), "vm"]);
    let stderr = out.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "{tag}: one line, not:\n{stderr}");
    assert!(stderr.contains(expected), "{tag}: no {expected:?} in:\n{stderr}");
    assert!(!home.vm("vm").exists(), "{tag}: a VM was made");
    assert!(
        home.cache_entries().is_empty(),
        "{tag}: cached: {:?}",
        home.cache_entries()
    );
}

/// A tar of `size` zero bytes at `name`, streamed through zstd (a few hundred KiB per GiB).
fn zstd_tar_of_zeros(name: &str, size: u64, qcow2_virtual_size: Option<u64>) -> Vec<u8> {
    let encoder = zstd::Encoder::new(Vec::new(), 1).unwrap();
    let mut builder = tar::Builder::new(encoder);
    let mut header = header(tar::EntryType::Regular, 0o444, size);
    set_names(&mut header, name, None);
    let head: Vec<u8> = match qcow2_virtual_size {
        // A qcow2 header whose disk is far smaller than the file.
        Some(virtual_size) => {
            let mut head = vec![0u8; 512];
            head[..4].copy_from_slice(b"QFI\xfb");
            head[4..8].copy_from_slice(&3u32.to_be_bytes());
            head[20..24].copy_from_slice(&16u32.to_be_bytes());
            head[24..32].copy_from_slice(&virtual_size.to_be_bytes());
            head
        }
        None => Vec::new(),
    };
    let body = io::Cursor::new(head.clone()).chain(io::repeat(0).take(size - head.len() as u64));
    builder.append(&header, body).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// Pushes pre-compressed layer blobs as an OCI image whose config lists `diff_ids` (if any).
fn push_blobs(registry: &Registry, repo: &str, tag: &str, media_type: &str, blobs: &[Vec<u8>], diff_ids: &[String]) {
    let mut config = json!({"architecture": "amd64", "os": "linux"});
    if !diff_ids.is_empty() {
        config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    }
    let config = serde_json::to_vec(&config).unwrap();
    let descriptor = |media_type: &str, data: &[u8]| json!({"mediaType": media_type, "size": data.len(), "digest": registry.push_blob(repo, data)});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": blobs.iter().map(|blob| descriptor(media_type, blob)).collect::<Vec<_>>(),
    });
    registry.push_manifest(repo, tag, OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
}

#[test]
fn bad_containerdisks_are_refused_with_one_line_and_leave_nothing_behind() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let disk = fs::read(tart_testkit::test_guest_image()).unwrap();
    let small = &disk[..1 << 20];
    let push = |tag: &str, compression: Compression, entries: &[Entry]| {
        push_image(
            &registry,
            "bad/disk",
            tag,
            Manifest::Oci,
            compression,
            &[tar(entries)],
            None,
        )
    };

    push(
        "no-disk",
        Compression::Gzip,
        &[Entry::Dir("disk/"), Entry::File("disks/x.img", small)],
    );
    refused(&home, host, "no-disk", "no file found in folder /disk, no disk present");

    push(
        "two-disks",
        Compression::Gzip,
        &[Entry::File("disk/a.qcow2", small), Entry::File("disk/b.img", small)],
    );
    refused(
        &home,
        host,
        "two-disks",
        "more than one file found in folder /disk, only one disk is allowed: /disk/a.qcow2, /disk/b.img",
    );

    push(
        "dot-dot",
        Compression::Zstd,
        &[Entry::File("disk/../../etc/cron.d/x", small)],
    );
    refused(
        &home,
        host,
        "dot-dot",
        "has a \"..\" component, a path escaping the image root",
    );

    push(
        "symlink-out",
        Compression::Plain,
        &[Entry::Symlink("disk/disk.img", "../../../etc/shadow")],
    );
    refused(
        &home,
        host,
        "symlink-out",
        "/disk/disk.img links to \"../../../etc/shadow\", outside the image root",
    );

    push(
        "hardlink-out",
        Compression::Plain,
        &[Entry::HardLink("disk/disk.img", "../etc/shadow")],
    );
    refused(
        &home,
        host,
        "hardlink-out",
        "/disk/disk.img links to \"../etc/shadow\", outside the image root",
    );

    // 2 GiB of zeros beside /disk: a few hundred KiB of zstd, stopped after the 1 GiB allowance.
    let bomb = zstd_tar_of_zeros("filler.bin", 2 << 30, None);
    assert!(bomb.len() < 1 << 20);
    push_blobs(
        &registry,
        "bad/disk",
        "bomb",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        &[bomb],
        &[],
    );
    refused(&home, host, "bomb", "decompresses to more than 1073741824 bytes");
    // A "qcow2" disk file of 4 GiB whose header says the disk is 64 MiB.
    let bomb = zstd_tar_of_zeros("disk/disk.qcow2", 4 << 30, Some(64 << 20));
    push_blobs(
        &registry,
        "bad/disk",
        "qcow2-bomb",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        &[bomb],
        &[],
    );
    refused(
        &home,
        host,
        "qcow2-bomb",
        "far more than a qcow2 file for its 67108864-byte disk can be",
    );

    let base = work.path().join("base.qcow2");
    let overlay = work.path().join("overlay.qcow2");
    qemu_img(&["create", "-f", "qcow2", path(&base), "64M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        path(&base),
        path(&overlay),
    ]);
    push(
        "backing-file",
        Compression::Gzip,
        &[Entry::File("disk/disk.qcow2", &fs::read(&overlay).unwrap())],
    );
    refused(
        &home,
        host,
        "backing-file",
        "/disk/disk.qcow2 is a qcow2 overlay on a backing file",
    );

    // A zstd frame has no checksum by default: the layer's diff_id is what catches this one.
    let layer = tar(&[Entry::File("disk/disk.img", &disk)]);
    for (tag, compression, media_type, expected) in [
        (
            "corrupt-gzip",
            Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "corrupt deflate stream",
        ),
        (
            "corrupt-zstd",
            Compression::Zstd,
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "(rootfs.diff_ids): the image is corrupt",
        ),
    ] {
        let mut blob = compression.compress(&layer);
        let middle = blob.len() / 2;
        blob[middle..middle + 64].iter_mut().for_each(|byte| *byte = !*byte);
        push_blobs(
            &registry,
            "bad/disk",
            tag,
            media_type,
            &[blob],
            &[sha256_digest(&layer)],
        );
        refused(&home, host, tag, expected);
    }

    // kubevirt/containerdisks' label with the upstream checksum of the disk file.
    push_image(
        &registry,
        "bad/disk",
        "wrong-shasum",
        Manifest::Docker,
        Compression::Gzip,
        &[tar(&[Entry::File("disk/disk.img", small)])],
        Some(&sha256_hex(b"another disk")),
    );
    refused(
        &home,
        host,
        "wrong-shasum",
        &format!("but the image's shasum label says {}", sha256_hex(b"another disk")),
    );

    // Intact in the registry, garbled on the way: the digest check fails the pull, also where
    // the garbled data already made decompression fail.
    let digests = push("garbled", Compression::Gzip, &[Entry::File("disk/disk.img", &disk)]);
    proxy.corrupt_blob(&digests[0]);
    refused(
        &home,
        host,
        "garbled",
        &format!("blob {} failed verification", digests[0]),
    );
}
