//! Image formats besides Tart's own, and multi-platform images, pulled by the real `tart` binary
//! from a real registry (Debian's `docker-registry` on 127.0.0.1, behind a proxy that logs every
//! request): vetu images written here with vetu's media types, annotations and LZ4 frames (not
//! by tart's push), booted by QEMU by direct kernel boot; an image index with two platforms and
//! an attestation entry; the `Format` column of `list` and `get`; and bad input.

use std::fs;
use std::io::Write;

use serde_json::{json, Value};
use tart_testkit::{sha256_digest, FaultProxy, Registry};

mod oci_common;
use oci_common::*;

const VETU_CONFIG: &str = "application/vnd.cirruslabs.vetu.config.v1";
const VETU_KERNEL: &str = "application/vnd.cirruslabs.vetu.kernel.v1";
const VETU_INITRAMFS: &str = "application/vnd.cirruslabs.vetu.initramfs.v1";
const VETU_DISK: &str = "application/vnd.cirruslabs.vetu.disk.v1";
const VETU_NAME: &str = "org.cirruslabs.vetu.name";
const VETU_SIZE: &str = "org.cirruslabs.vetu.uncompressed-size";
const VETU_DIGEST: &str = "org.cirruslabs.vetu.uncompressed-digest";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------
// vetu images, as `vetu push` writes them (vetu-format.md §2)
// ---------------------------------------------------------------------------------------------

struct Vetu<'a> {
    arch: &'a str,
    cmdline: &'a str,
    kernel: &'a [u8],
    initramfs: Option<&'a [u8]>,
    /// The disk `disk.img`, one layer per chunk (vetu's chunks have arbitrary sizes).
    chunks: &'a [Vec<u8>],
}

/// One LZ4 frame as pierrec/lz4's writer makes it with vetu's settings: independent 4 MiB
/// blocks, content checksum.
fn lz4_frame(data: &[u8]) -> Vec<u8> {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    let info = FrameInfo::new()
        .block_size(BlockSize::Max4MB)
        .block_mode(BlockMode::Independent)
        .content_checksum(true);
    let mut encoder = FrameEncoder::with_frame_info(info, Vec::new());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Config, kernel, initramfs and disk layers stored in `repo`; their descriptors in vetu's order.
/// Config, kernel and initramfs descriptors carry no `annotations` key, as vetu's.
fn vetu_layers(registry: &Registry, repo: &str, image: &Vetu) -> Vec<Value> {
    // Go's encoding/json: compact, keys in declaration order.
    let config = format!(
        r#"{{"version":1,"arch":"{}","cmdline":{},"disks":[{{"name":"disk.img"}}],"cpuCount":1,"memorySize":536870912,"macAddress":"a6:1f:3c:22:90:0e"}}"#,
        image.arch,
        serde_json::to_string(image.cmdline).unwrap()
    );
    let plain = |media_type: &str, data: &[u8]| json!({"mediaType": media_type, "digest": registry.push_blob(repo, data), "size": data.len()});
    let mut layers = vec![plain(VETU_CONFIG, config.as_bytes()), plain(VETU_KERNEL, image.kernel)];
    if let Some(initramfs) = image.initramfs {
        layers.push(plain(VETU_INITRAMFS, initramfs));
    }
    for chunk in image.chunks {
        let blob = lz4_frame(chunk);
        layers.push(descriptor(
            VETU_DISK,
            &blob,
            &registry.push_blob(repo, &blob),
            json!({
                VETU_NAME: "disk.img",
                VETU_SIZE: chunk.len().to_string(),
                VETU_DIGEST: sha256_digest(chunk),
            }),
        ));
    }
    layers
}

/// An OCI image manifest with vetu's minimal OCI config (the pushing host's architecture) and
/// no annotations; returns its digest.
fn store_manifest(registry: &Registry, repo: &str, tag: &str, layers: Vec<Value>) -> String {
    let oci_config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": OCI_CONFIG_TYPE, "digest": registry.push_blob(repo, oci_config), "size": oci_config.len()},
        "layers": layers,
    });
    registry.push_manifest(repo, tag, MANIFEST_TYPE, &serde_json::to_vec(&manifest).unwrap())
}

fn store_vetu(registry: &Registry, repo: &str, tag: &str, image: &Vetu) -> String {
    let layers = vetu_layers(registry, repo, image);
    store_manifest(registry, repo, tag, layers)
}

/// The test guest's kernel, initramfs and command line (what `build-test-guest` puts into its
/// unified kernel image) and its disk.
struct Guest {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
    cmdline: String,
    disk: Vec<u8>,
}

fn test_guest() -> Guest {
    let image = tart_testkit::test_guest_image();
    let build = image.parent().unwrap();
    let kernel_dir = fs::read_dir(build.join("cache"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy();
            name.starts_with("linux-image-") && !name.contains("cloud") && dir.join("vmlinuz").is_file()
        })
        .expect("build-test-guest keeps the kernel in build/guest/cache/linux-image-*/vmlinuz");
    Guest {
        kernel: fs::read(kernel_dir.join("vmlinuz")).unwrap(),
        initramfs: fs::read(build.join("initramfs.cpio")).unwrap(),
        cmdline: fs::read_to_string(build.join("cmdline")).unwrap(),
        disk: fs::read(image).unwrap(),
    }
}

/// The ESP of the test guest's disk (1 MiB to 41 MiB, see build-test-guest's layout).
const ESP: std::ops::Range<usize> = (1 << 20)..(41 << 20);

fn json_of(out: &Out) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn blob_gets(proxy: &FaultProxy) -> Vec<String> {
    proxy
        .requests()
        .iter()
        .filter_map(|request| request.blob_get().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// vetu: clone, boot, list, cross-format reuse
// ---------------------------------------------------------------------------------------------

#[test]
fn vetu_image_boots_by_direct_kernel_boot_and_shares_its_chunks_with_a_tart_image() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let guest = test_guest();
    // Without its ESP the disk cannot boot through UEFI: only the image's own kernel can bring
    // the guest to its marker. Data past the partitions makes every chunk non-zero.
    let mut disk = guest.disk.clone();
    disk[ESP].fill(0);
    disk[45_000_000..46_000_000].copy_from_slice(&random_bytes(1_000_000, 7));
    let chunks = vec![
        disk[..20_000_000].to_vec(),
        disk[20_000_000..50_000_000].to_vec(),
        disk[50_000_000..].to_vec(),
    ];
    let vetu = Vetu {
        arch: "amd64",
        cmdline: &guest.cmdline,
        kernel: &guest.kernel,
        initramfs: Some(&guest.initramfs),
        chunks: &chunks,
    };
    let digest = store_vetu(&registry, "vetu/guest", "latest", &vetu);
    let home = Home::new();

    let out = home.ok(&["clone", "--insecure", &format!("{host}/vetu/guest:latest"), "vm"]);
    assert!(
        out.stdout.contains("pulling kernel...") && out.stdout.contains("pulling initramfs..."),
        "{}",
        out.stdout
    );
    let cached = home.image_dir(host, "vetu/guest", &digest);
    for dir in [cached.clone(), home.vm("vm")] {
        assert_file_is(&dir.join("disk.img"), &disk);
        assert_file_is(&dir.join("kernel"), &guest.kernel);
        assert_file_is(&dir.join("initramfs"), &guest.initramfs);
    }
    let config: Value = serde_json::from_slice(&fs::read(home.vm("vm").join("config.json")).unwrap()).unwrap();
    assert_eq!(config["kernelCommandLine"], guest.cmdline.as_str());
    assert_eq!(config["imageFormat"], "vetu");
    assert_eq!(
        (config["cpuCount"].as_u64(), config["memorySize"].as_u64()),
        (Some(1), Some(512 << 20))
    );
    // vetu's MAC: Tart's clone changes a MAC only when another local VM has it.
    assert_eq!(config["macAddress"], "a6:1f:3c:22:90:0e");

    // A Tart image cut at the same places gets every chunk from the vetu image: nothing of its
    // disk is downloaded.
    let tart = store_v2_image(&registry, "tart/guest", "v1", &chunks);
    proxy.clear_requests();
    let out = home.ok(&["pull", "--insecure", &format!("{host}/tart/guest:v1")]);
    assert!(out.stdout.contains("already in local images"), "{}", out.stdout);
    let fetched = blob_gets(&proxy);
    assert!(
        tart.layers.iter().all(|layer| !fetched.contains(layer)),
        "disk layers were downloaded: {fetched:?}"
    );
    assert_pulled(&home, host, "tart/guest", &tart);

    // Format, last in text and JSON, for cached images and the local VM.
    let list_out = home.ok(&["list", "--format", "json"]);
    let list = json_of(&list_out);
    let format_of = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["Name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {list}"))["Format"]
            .clone()
    };
    assert_eq!(format_of("vm"), "vetu");
    assert_eq!(format_of(&format!("{host}/vetu/guest:latest")), "vetu");
    assert_eq!(format_of(&format!("{host}/tart/guest:v1")), "tart");
    let first_entry = &list_out.stdout[..list_out.stdout.find('}').unwrap()];
    assert!(
        first_entry
            .trim_end()
            .rsplit('\n')
            .next()
            .unwrap()
            .contains("\"Format\""),
        "Format comes last: {first_entry}"
    );
    let text = home.ok(&["list"]).stdout;
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["Source", "Name", "Disk", "Size", "Accessed", "State", "Format"]
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("local") && l.contains(" vm ") && l.trim_end().ends_with("vetu")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("tart/guest:v1") && l.trim_end().ends_with("tart")),
        "{text}"
    );
    let get = json_of(&home.ok(&["get", "vm", "--format", "json"]));
    assert_eq!(get["Format"], "vetu");
    assert_eq!(get["OS"], "linux");
    home.ok(&["clone", &format!("{host}/tart/guest:v1"), "from-tart"]);
    assert_eq!(
        json_of(&home.ok(&["get", "from-tart", "--format", "json"]))["Format"],
        "tart"
    );
    let get_text = home.ok(&["get", "vm"]).stdout;
    assert!(
        get_text
            .lines()
            .next()
            .unwrap()
            .trim_end()
            .ends_with("CloudInit Format"),
        "{get_text}"
    );
    assert!(
        get_text.lines().nth(1).unwrap().trim_end().ends_with("vetu"),
        "{get_text}"
    );

    // Pushed, it is a Tart image (with vetu's command line in its config, which Tart ignores).
    home.ok(&["push", "--insecure", "vm", &format!("{host}/pushed/vm:v1")]);
    let (_, manifest) = manifest_of(&registry, "pushed/vm", "v1");
    let types: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| layer["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        (types[0], types[1], types[types.len() - 1]),
        (CONFIG_TYPE, DISK_V2, NVRAM_TYPE)
    );
    let pushed_config = registry.blob("pushed/vm", manifest["layers"][0]["digest"].as_str().unwrap());
    let pushed_config: Value = serde_json::from_slice(&pushed_config).unwrap();
    assert_eq!(pushed_config.get("imageFormat"), None);

    boot_test_guest(&home, "vm");
}

#[test]
fn a_corrupt_vetu_layer_fails_verification_and_only_it_is_fetched_again() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let chunks = [data_chunk(4), data_chunk(5)];
    let layers = vetu_layers(&registry, "vetu/vm", &small_vetu("amd64", &chunks));
    let disk_layers: Vec<String> = layers
        .iter()
        .filter(|layer| layer["mediaType"] == VETU_DISK)
        .map(|layer| layer["digest"].as_str().unwrap().to_owned())
        .collect();
    let digest = store_manifest(&registry, "vetu/vm", "v1", layers);
    let name = format!("{host}/vetu/vm:v1");
    let home = Home::new();

    proxy.corrupt_blob(&disk_layers[1]);
    // One layer at a time, so the good layer is complete before the bad one fails.
    let out = home.fail(&["pull", "--insecure", "--concurrency", "1", &name]);
    assert!(out.stderr.contains("failed verification"), "{}", out.stderr);
    assert!(home.cache_entries().is_empty());

    proxy.clear_faults();
    proxy.clear_requests();
    home.ok(&["pull", "--insecure", "--concurrency", "1", &name]);
    let fetched = blob_gets(&proxy);
    assert!(
        !fetched.contains(&disk_layers[0]),
        "the verified layer was fetched again: {fetched:?}"
    );
    assert!(fetched.contains(&disk_layers[1]));
    assert_file_is(
        &home.image_dir(host, "vetu/vm", &digest).join("disk.img"),
        &chunks.concat(),
    );
}

// ---------------------------------------------------------------------------------------------
// Multi-platform images
// ---------------------------------------------------------------------------------------------

/// An index of `entries` (manifest digest, os, architecture), each a manifest stored in `repo`:
/// an OCI index, or a Docker manifest list with `media_type` [`DOCKER_LIST`].
fn store_index(registry: &Registry, repo: &str, tag: &str, media_type: &str, entries: &[(&str, &str, &str)]) -> String {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(digest, os, arch)| {
            let (bytes, _) = registry.manifest(repo, digest);
            json!({
                "mediaType": MANIFEST_TYPE,
                "digest": digest,
                "size": bytes.len(),
                "platform": {"os": os, "architecture": arch},
            })
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests});
    registry.push_manifest(repo, tag, media_type, &serde_json::to_vec(&index).unwrap())
}

/// What buildx puts next to the images: an attestation manifest, platform `unknown/unknown`.
fn store_attestation(registry: &Registry, repo: &str) -> String {
    let statement = br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#;
    let layer = json!({
        "mediaType": "application/vnd.in-toto+json",
        "digest": registry.push_blob(repo, statement),
        "size": statement.len(),
    });
    store_manifest(registry, repo, "attestation", vec![layer])
}

fn small_vetu<'a>(arch: &'a str, chunks: &'a [Vec<u8>]) -> Vetu<'a> {
    Vetu {
        arch,
        cmdline: "console=ttyAMA0",
        kernel: b"not booted in this test",
        initramfs: None,
        chunks,
    }
}

#[test]
fn an_index_gives_the_hosts_platform_or_the_one_asked_for() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let repo = "multi/vm";
    let amd64 = store_v2_image(&registry, repo, "amd64", &[data_chunk(1)]);
    let arm64_disk = [data_chunk(2)];
    let arm64 = store_vetu(&registry, repo, "arm64", &small_vetu("arm64", &arm64_disk));
    let attestation = store_attestation(&registry, repo);
    store_index(
        &registry,
        repo,
        "latest",
        OCI_INDEX,
        &[
            (&attestation, "unknown", "unknown"),
            (&arm64, "linux", "arm64"),
            (&amd64.digest, "linux", "amd64"),
        ],
    );
    let name = format!("{host}/{repo}:latest");
    let home = Home::new();

    let out = home.ok(&["pull", "--insecure", &name]);
    assert!(
        out.stdout
            .contains(&format!("using the linux/amd64 image of the index: {}", amd64.digest)),
        "{}",
        out.stdout
    );
    assert_pulled(&home, host, repo, &amd64);
    let tag = home.repo_dir(host, repo).join("latest");
    assert_eq!(fs::read_link(&tag).unwrap(), home.image_dir(host, repo, &amd64.digest));
    assert!(!out.stdout.contains("emulation"), "{}", out.stdout);

    // --arch on clone: the tag's cached image is the other platform's, so clone pulls.
    let out = home.ok(&["clone", "--insecure", "--arch", "arm64", &name, "arm"]);
    assert!(
        out.stdout.contains("using the linux/arm64 image of the index"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("note: this is an arm64 VM; on this amd64 host it will run under emulation"),
        "{}",
        out.stdout
    );
    assert_eq!(fs::read_link(&tag).unwrap(), home.image_dir(host, repo, &arm64));
    assert_file_is(&home.disk("arm"), &arm64_disk[0]);
    let get = json_of(&home.ok(&["get", "arm", "--format", "json"]));
    assert_eq!(get["Format"], "vetu");

    // A platform the index lacks is refused before any blob is fetched, naming those it has.
    let only_amd64 = format!("{host}/{repo}:only-amd64");
    store_index(
        &registry,
        repo,
        "only-amd64",
        DOCKER_LIST,
        &[(&attestation, "unknown", "unknown"), (&amd64.digest, "linux", "amd64")],
    );
    let fresh = Home::new();
    proxy.clear_requests();
    let out = fresh.fail(&["clone", "--insecure", "--arch", "arm64", &only_amd64, "vm"]);
    assert_eq!(
        out.stderr.trim_end(),
        "the image has no linux/arm64 variant; it has linux/amd64 (pick one with --arch)"
    );
    assert_eq!(blob_gets(&proxy), Vec::<String>::new());
    assert!(fresh.cache_entries().is_empty() && !fresh.vm("vm").exists());
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// `tart clone` of `repo:tag` fails with one line containing `expected`, and leaves nothing in
/// the cache or under `vms/`.
fn refused(home: &Home, host: &str, repo: &str, tag: &str, expected: &str) {
    let out = home.fail(&["clone", "--insecure", &format!("{host}/{repo}:{tag}"), "vm"]);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(
        out.stderr.contains(expected),
        "{repo}:{tag}: {} should say {expected}",
        out.stderr
    );
    assert!(home.cache_entries().is_empty(), "{:?}", home.cache_entries());
    assert!(!home.vm("vm").exists());
}

#[test]
fn bad_images_are_refused_with_one_line_and_leave_nothing_behind() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let home = Home::new();
    let repo = "bad/vm";
    let chunks = [data_chunk(3)];
    let good = vetu_layers(&registry, repo, &small_vetu("amd64", &chunks));
    let variant = |tag: &str, change: &dyn Fn(&mut Vec<Value>)| {
        let mut layers = good.clone();
        change(&mut layers);
        store_manifest(&registry, repo, tag, layers);
    };
    let disk_layer = |layers: &mut Vec<Value>| layers.iter_mut().find(|l| l["mediaType"] == VETU_DISK).unwrap().clone();
    let set_disk = |layers: &mut Vec<Value>, disk: Value| {
        let at = layers.iter().position(|l| l["mediaType"] == VETU_DISK).unwrap();
        layers[at] = disk;
    };

    let model = json!({
        "mediaType": "application/vnd.example.model.v1",
        "digest": registry.push_blob(repo, b"weights"),
        "size": 7,
    });
    store_manifest(&registry, repo, "unknown", vec![model]);
    refused(
        &home,
        host,
        repo,
        "unknown",
        "unsupported image: its layers (application/vnd.example.model.v1) are none of the formats tart pulls: \
         Tart VM images, vetu VM images and KubeVirt containerDisks",
    );

    let attestation = store_attestation(&registry, repo);
    store_index(
        &registry,
        repo,
        "no-platform",
        OCI_INDEX,
        &[(&attestation, "unknown", "unknown")],
    );
    refused(
        &home,
        host,
        repo,
        "no-platform",
        "the image index lists no platform that can run",
    );

    variant("no-kernel", &|layers| layers.retain(|l| l["mediaType"] != VETU_KERNEL));
    refused(
        &home,
        host,
        repo,
        "no-kernel",
        "a vetu image has exactly one kernel layer",
    );

    variant("no-name", &|layers| {
        let mut disk = disk_layer(layers);
        disk["annotations"].as_object_mut().unwrap().remove(VETU_NAME);
        set_disk(layers, disk);
    });
    refused(
        &home,
        host,
        repo,
        "no-name",
        "lacks the org.cirruslabs.vetu.name annotation",
    );

    variant("bad-size", &|layers| {
        let mut disk = disk_layer(layers);
        disk["annotations"][VETU_SIZE] = json!("4MiB");
        set_disk(layers, disk);
    });
    refused(
        &home,
        host,
        repo,
        "bad-size",
        "malformed org.cirruslabs.vetu.uncompressed-size \"4MiB\"",
    );

    variant("wrong-digest", &|layers| {
        let mut disk = disk_layer(layers);
        disk["annotations"][VETU_DIGEST] = json!(sha256_digest(b"other content"));
        set_disk(layers, disk);
    });
    refused(
        &home,
        host,
        repo,
        "wrong-digest",
        "failed verification: its content has digest",
    );

    variant("unknown-disk", &|layers| {
        let mut disk = disk_layer(layers);
        disk["annotations"][VETU_NAME] = json!("data.img");
        set_disk(layers, disk);
    });
    refused(
        &home,
        host,
        repo,
        "unknown-disk",
        "belongs to disk \"data.img\", which the image's VM config does not list (it lists disk.img)",
    );
}
