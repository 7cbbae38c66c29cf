//! Push, pull, clone and login against real registries (Debian's CNCF distribution server on
//! 127.0.0.1), through a fault-injecting proxy where the registry must misbehave.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::prelude::*;
use serde_json::Value;
use tart_testkit::{sha256_digest, FaultProxy, Registry};

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("tart")
    }

    fn tart(&self) -> Command {
        let mut cmd = Command::cargo_bin("tart").unwrap();
        cmd.env("TART_HOME", self.root())
            .env("HOME", self.dir.path())
            .env("CI", "1")
            .env_remove("TART_REGISTRY_USERNAME")
            .env_remove("TART_REGISTRY_PASSWORD")
            .env_remove("TART_REGISTRY_HOSTNAME")
            .env_remove("DOCKER_CONFIG");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.tart().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tart {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn vm(&self, name: &str) -> PathBuf {
        self.root().join("vms").join(name)
    }

    /// A 1 GB VM (two disk chunks) with random data in both chunks.
    fn vm_with_data(&self, name: &str, seed: u8) -> PathBuf {
        self.ok(&["create", "--linux", "--disk-size", "1", name]);
        let disk = self.vm(name).join("disk.img");
        write_random(&disk, 4096, 3 << 20, seed);
        write_random(&disk, 700 << 20, 2 << 20, seed.wrapping_add(1));
        disk
    }

    fn cache_images(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.root().join("cache/OCIs")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.file_name().unwrap().to_string_lossy().starts_with("sha256:") || path.is_symlink() {
                    found.push(path);
                } else if path.is_dir() {
                    stack.push(path);
                }
            }
        }
        found
    }
}

fn write_random(path: &Path, offset: u64, len: usize, seed: u8) {
    let mut state = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&data, offset)
        .unwrap();
}

/// The config is compared as JSON: Tart pushes it compact and writes it pretty locally.
fn same_files(a: &Path, b: &Path) {
    let config = |dir: &Path| serde_json::from_slice::<Value>(&fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config(a), config(b));
    for file in ["nvram.bin", "disk.img"] {
        let (left, right) = (a.join(file), b.join(file));
        assert!(
            fs::read(&left).unwrap() == fs::read(&right).unwrap(),
            "{} differs from {}",
            left.display(),
            right.display()
        );
    }
}

fn manifest_json(registry: &Registry, repo: &str, reference: &str) -> (Vec<u8>, Value) {
    let (bytes, _) = registry.manifest(repo, reference);
    let json = serde_json::from_slice(&bytes).unwrap();
    (bytes, json)
}

fn disk_layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.cirruslabs.tart.disk.v2")
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn push_then_pull_round_trips_byte_for_byte() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let source = Home::new();
    source.vm_with_data("src", 1);
    let out = source.ok(&[
        "push",
        "--insecure",
        "--label",
        "team=ci",
        "src",
        &format!("{host}/org/vm:v1"),
        &format!("{host}/org/vm:v2"),
    ]);
    assert!(
        out.contains(&format!("pushing src to {host}/org/vm{{:v1,:v2}}...")),
        "{out}"
    );
    assert!(out.contains("pushing disk... this will take a while..."), "{out}");
    assert_eq!(registry.tags("org/vm"), ["v1", "v2"]);

    let (bytes, manifest) = manifest_json(&registry, "org/vm", "v1");
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.starts_with(r#"{"annotations":{"org.cirruslabs.tart.uncompressed-disk-size":"1000000000","org.cirruslabs.tart.upload-time":""#), "{text}");
    assert!(
        text.contains(r#""mediaType":"application\/vnd.oci.image.manifest.v1+json""#),
        "{text}"
    );
    let media: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        media,
        [
            "application/vnd.cirruslabs.tart.config.v1",
            "application/vnd.cirruslabs.tart.disk.v2",
            "application/vnd.cirruslabs.tart.disk.v2",
            "application/vnd.cirruslabs.tart.nvram.v1"
        ]
    );
    let chunk = &manifest["layers"][2]["annotations"];
    assert_eq!(
        chunk["org.cirruslabs.tart.uncompressed-size"],
        (1_000_000_000u64 - (512 << 20)).to_string()
    );
    let disk = fs::read(source.vm("src").join("disk.img")).unwrap();
    assert_eq!(
        chunk["org.cirruslabs.tart.uncompressed-content-digest"],
        sha256_digest(&disk[512 << 20..])
    );
    let oci_config: Value =
        serde_json::from_slice(&registry.blob("org/vm", manifest["config"]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(oci_config["config"]["Labels"]["team"], "ci");
    assert_eq!(oci_config["config"]["Labels"]["org.cirruslabs.tart.disk.format"], "raw");
    assert_eq!(oci_config["os"], "linux");

    let target = Home::new();
    let out = target.ok(&["pull", "--insecure", &format!("{host}/org/vm:v1")]);
    assert!(out.contains(&format!("pulling {host}/org/vm:v1...")), "{out}");
    assert!(out.contains("pulling NVRAM..."), "{out}");
    let digest = sha256_digest(&bytes);
    let repo = target
        .root()
        .join(format!("cache/OCIs/{}/org/vm", host.replace(':', "%3A")));
    let image = repo.join(&digest);
    same_files(&source.vm("src"), &image);
    assert_eq!(fs::read_link(repo.join("v1")).unwrap(), image);
    assert_eq!(fs::read(image.join("manifest.json")).unwrap(), bytes);
    let listed = target.ok(&["list", "--source", "oci", "-q"]);
    assert_eq!(listed, format!("{host}/org/vm:v1\n{host}/org/vm@{digest}\n"));

    let again = target.ok(&["pull", "--insecure", &format!("{host}/org/vm:v1")]);
    assert!(again.contains("image is already cached and linked!"), "{again}");
    target.ok(&["clone", &format!("{host}/org/vm:v1"), "local"]);
    same_files(&target.vm("local"), &image);

    target.ok(&["pull", "--insecure", &format!("{host}/org/vm@{digest}")]);
    assert!(image.join(".explicitly-pulled").exists());
    assert_eq!(
        fs::read_dir(target.root().join("tmp")).unwrap().count(),
        0,
        "staging is gone"
    );
}

#[test]
fn clone_pulls_an_uncached_image_first() {
    let registry = Registry::anonymous();
    let source = Home::new();
    source.vm_with_data("src", 2);
    let name = format!("{}/a/b/c:latest", registry.host());
    source.ok(&["push", "--insecure", "src", &name]);
    let target = Home::new();
    let out = target.ok(&["clone", "--insecure", &name, "copy"]);
    assert!(out.contains(&format!("pulling {name}...")), "{out}");
    same_files(&source.vm("src"), &target.vm("copy"));
}

#[test]
fn login_logout_and_environment_credentials_on_a_basic_auth_registry() {
    let registry = Registry::basic("alice", "s3cret");
    let host = registry.host().to_owned();
    let home = Home::new();
    home.vm_with_data("vm", 3);
    let name = format!("{host}/private/vm:v1");

    let out = home.run(&["push", "--insecure", "vm", &name]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("tart login {host}")), "{stderr}");

    let login = |password: &str| {
        let mut child = home
            .tart()
            .args(["login", &host, "--insecure", "--username", "alice", "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{password}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let wrong = login("nope");
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("invalid credentials"));
    assert!(!home.root().join("credentials.json").exists());

    assert!(login("s3cret").status.success());
    let store = home.root().join("credentials.json");
    assert_eq!(fs::metadata(&store).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!String::from_utf8_lossy(&home.run(&["list"]).stderr).contains("s3cret"));
    home.ok(&["push", "--insecure", "vm", &name]);
    home.ok(&["pull", "--insecure", &name]);

    home.ok(&["logout", &host]);
    assert!(!home.run(&["push", "--insecure", "vm", &name]).status.success());

    let with_env = |hostname: &str| {
        home.tart()
            .env("TART_REGISTRY_USERNAME", "alice")
            .env("TART_REGISTRY_PASSWORD", "s3cret")
            .env("TART_REGISTRY_HOSTNAME", hostname)
            .args(["push", "--insecure", "vm", &name])
            .output()
            .unwrap()
    };
    assert!(with_env(&host).status.success());
    assert!(
        !with_env("elsewhere.example:5000").status.success(),
        "credentials are only for TART_REGISTRY_HOSTNAME"
    );
}

#[test]
fn token_auth_registry_push_and_pull() {
    let registry = Registry::token("bob", "hunter2");
    let name = format!("{}/team/vm:v1", registry.host());
    let source = Home::new();
    source.vm_with_data("vm", 4);
    let with_creds = |home: &Home, args: &[&str]| {
        let out = home
            .tart()
            .env("TART_REGISTRY_USERNAME", "bob")
            .env("TART_REGISTRY_PASSWORD", "hunter2")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    with_creds(&source, &["push", "--insecure", "vm", &name]);
    let target = Home::new();
    with_creds(&target, &["clone", "--insecure", &name, "copy"]);
    same_files(&source.vm("vm"), &target.vm("copy"));
    assert!(registry
        .token_requests()
        .iter()
        .any(|r| r.granted && r.user.as_deref() == Some("bob")));
}

/// An image pushed to `registry`, for tests that pull it through a proxy.
fn published(registry: &Registry, repo: &str, seed: u8) -> (Home, String, Value) {
    let source = Home::new();
    source.vm_with_data("src", seed);
    source.ok(&["push", "--insecure", "src", &format!("{}/{repo}:v1", registry.host())]);
    let (_, manifest) = manifest_json(registry, repo, "v1");
    (source, format!("{repo}:v1"), manifest)
}

#[test]
fn corrupted_blob_fails_verification_and_leaves_the_cache_untouched() {
    let registry = Registry::anonymous();
    let (source, reference, manifest) = published(&registry, "corrupt/vm", 5);
    let proxy = FaultProxy::start(registry.host());
    let [good, bad] = <[String; 2]>::try_from(disk_layer_digests(&manifest)).unwrap();
    proxy.corrupt_blob(&bad);

    let home = Home::new();
    let name = format!("{}/{reference}", proxy.host());
    // One layer at a time, so the good layer is complete before the bad one fails.
    let out = home.run(&["pull", "--insecure", "--concurrency", "1", &name]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed verification"), "{stderr}");
    assert!(home.cache_images().is_empty(), "nothing half-made in the cache");

    proxy.clear_faults();
    proxy.clear_requests();
    home.ok(&["pull", "--insecure", &name]);
    assert!(
        proxy.blob_gets(&good).is_empty(),
        "the verified layer is not fetched again"
    );
    assert_eq!(proxy.blob_gets(&bad).len(), 1);
    same_files(
        &source.vm("src"),
        &home
            .root()
            .join(format!("cache/OCIs/{}/corrupt/vm/v1", proxy.host().replace(':', "%3A"))),
    );
}

#[test]
fn dropped_connection_resumes_the_blob_with_range() {
    let registry = Registry::anonymous();
    let (source, reference, manifest) = published(&registry, "flaky/vm", 6);
    let proxy = FaultProxy::start(registry.host());
    let layer = disk_layer_digests(&manifest).remove(0);
    proxy.truncate_blob_after(&layer, 1 << 20, 1);

    let home = Home::new();
    let out = home
        .tart()
        .args(["clone", "--insecure", &format!("{}/{reference}", proxy.host()), "vm"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("attempting to re-try"));
    let gets = proxy.blob_gets(&layer);
    assert_eq!(gets.len(), 2, "{gets:?}");
    let resumed = gets[1].range.as_deref().unwrap();
    assert!(
        resumed.starts_with("bytes=") && resumed != "bytes=0-",
        "resumed with {resumed}"
    );
    same_files(&source.vm("src"), &home.vm("vm"));
}

#[test]
fn registry_lying_about_sizes_never_yields_a_wrong_image() {
    let registry = Registry::anonymous();
    let (source, reference, manifest) = published(&registry, "liar/vm", 7);
    let proxy = FaultProxy::start(registry.host());
    let layer = disk_layer_digests(&manifest).remove(1);
    proxy.lie_content_length(&layer, -1000);
    let home = Home::new();
    let out = home.run(&["clone", "--insecure", &format!("{}/{reference}", proxy.host()), "vm"]);
    if out.status.success() {
        same_files(&source.vm("src"), &home.vm("vm"));
    } else {
        assert!(home.cache_images().is_empty());
        assert!(!home.vm("vm").exists());
    }
}

#[test]
fn killed_pull_resumes_without_refetching_verified_layers() {
    let registry = Registry::anonymous();
    let (source, reference, manifest) = published(&registry, "slow/vm", 8);
    let proxy = FaultProxy::start(registry.host());
    let [first, second] = <[String; 2]>::try_from(disk_layer_digests(&manifest)).unwrap();
    proxy.delay_blob(&second, Duration::from_secs(30));
    let home = Home::new();
    let name = format!("{}/{reference}", proxy.host());

    let mut pull = home
        .tart()
        .args(["pull", "--insecure", "--concurrency", "1", &name])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let journal = loop {
        let found = fs::read_dir(home.root().join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("disk-layers.done"))
            .find(|p| fs::read_to_string(p).is_ok_and(|s| !s.is_empty()));
        if let Some(journal) = found {
            break journal;
        }
        assert!(Instant::now() < deadline, "the first layer never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    pull.kill().unwrap();
    pull.wait().unwrap();
    assert!(journal.exists());
    assert!(
        home.cache_images().is_empty(),
        "a killed pull leaves nothing in the cache"
    );

    proxy.clear_faults();
    proxy.clear_requests();
    home.ok(&["list"]);
    assert!(
        journal.exists(),
        "other commands leave a fresh pull staging directory alone"
    );
    home.ok(&["pull", "--insecure", &name]);
    assert!(proxy.blob_gets(&first).is_empty(), "the journaled layer is reused");
    same_files(
        &source.vm("src"),
        &home
            .root()
            .join(format!("cache/OCIs/{}/slow/vm/v1", proxy.host().replace(':', "%3A"))),
    );
}

#[test]
fn concurrent_pulls_of_one_image_download_it_once() {
    let registry = Registry::anonymous();
    let (_source, reference, manifest) = published(&registry, "busy/vm", 9);
    let proxy = FaultProxy::start(registry.host());
    let home = Home::new();
    let name = format!("{}/{reference}", proxy.host());
    let pulls: Vec<_> = (0..2)
        .map(|_| {
            home.tart()
                .args(["pull", "--insecure", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for pull in pulls {
        let out = pull.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for digest in disk_layer_digests(&manifest) {
        assert_eq!(proxy.blob_gets(&digest).len(), 1, "{digest} fetched more than once");
    }
}

#[test]
fn zero_chunks_and_chunks_of_cached_images_are_not_downloaded() {
    let registry = Registry::anonymous();
    let source = Home::new();
    // Data only in the first chunk: the second is all zeros.
    source.ok(&["create", "--linux", "--disk-size", "1", "a"]);
    write_random(&source.vm("a").join("disk.img"), 0, 5 << 20, 10);
    source.ok(&["push", "--insecure", "a", &format!("{}/reuse/a:v1", registry.host())]);
    // Same first chunk, different second chunk, in another repository.
    source.ok(&["clone", "a", "b"]);
    write_random(&source.vm("b").join("disk.img"), 800 << 20, 1 << 20, 11);
    source.ok(&["push", "--insecure", "b", &format!("{}/reuse/b:v1", registry.host())]);
    let (_, a) = manifest_json(&registry, "reuse/a", "v1");
    let (_, b) = manifest_json(&registry, "reuse/b", "v1");
    let (a_layers, b_layers) = (disk_layer_digests(&a), disk_layer_digests(&b));

    let proxy = FaultProxy::start(registry.host());
    let home = Home::new();
    let out = home.ok(&["pull", "--insecure", &format!("{}/reuse/a:v1", proxy.host())]);
    assert!(out.contains("avoided fetching"), "{out}");
    assert!(
        proxy.blob_gets(&a_layers[1]).is_empty(),
        "the all-zero chunk is not downloaded"
    );
    home.ok(&["clone", "--insecure", &format!("{}/reuse/b:v1", proxy.host()), "b"]);
    assert_eq!(
        proxy.blob_gets(&b_layers[0]).len(),
        1,
        "only pulling a fetched it: {:?}",
        proxy.requests()
    );
    assert_eq!(proxy.blob_gets(&b_layers[1]).len(), 1);
    same_files(&source.vm("b"), &home.vm("b"));
}

#[test]
fn foreign_manifests_are_refused_and_legacy_v1_images_are_read() {
    let registry = Registry::anonymous();
    let layer = registry.push_blob("docker/app", b"not a disk");
    let config = registry.push_blob("docker/app", b"{}");
    let foreign = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer, "size": 10}],
    });
    registry.push_manifest(
        "docker/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        foreign.to_string().as_bytes(),
    );
    let home = Home::new();
    let out = home.run(&["pull", "--insecure", &format!("{}/docker/app:v1", registry.host())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Tart VM image"));
    assert!(home.cache_images().is_empty());
    let bad = home.run(&["pull", &format!("{}/docker/app@sha256:xyz", registry.host())]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("failed to parse remote name"));

    // Tart < 2.0: the whole disk as one Apple LZ4 stream cut into pieces.
    home.ok(&["create", "--linux", "--disk-size", "1", "seed"]);
    let mut disk = vec![0u8; 3 << 20];
    disk[12345..12345 + 5].copy_from_slice(b"tart!");
    let stream = apple_lz4::compress(&disk);
    let (first, second) = stream.split_at(stream.len() / 2);
    let descriptor = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": registry.push_blob("legacy/vm", data), "size": data.len()});
    let config_json = fs::read(home.vm("seed").join("config.json")).unwrap();
    let nvram = fs::read(home.vm("seed").join("nvram.bin")).unwrap();
    let legacy = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", b"{}"),
        "layers": [
            descriptor("application/vnd.cirruslabs.tart.config.v1", &config_json),
            descriptor("application/vnd.cirruslabs.tart.disk.v1", first),
            descriptor("application/vnd.cirruslabs.tart.disk.v1", second),
            descriptor("application/vnd.cirruslabs.tart.nvram.v1", &nvram),
        ],
    });
    registry.push_manifest(
        "legacy/vm",
        "old",
        "application/vnd.oci.image.manifest.v1+json",
        legacy.to_string().as_bytes(),
    );
    home.ok(&[
        "clone",
        "--insecure",
        &format!("{}/legacy/vm:old", registry.host()),
        "old",
    ]);
    assert!(fs::read(home.vm("old").join("disk.img")).unwrap() == disk);
}

#[test]
fn retag_populate_cache_chunked_upload_and_cross_repository_mount() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host().to_owned();
    let home = Home::new();
    home.vm_with_data("vm", 12);

    home.ok(&[
        "push",
        "--insecure",
        "--populate-cache",
        "--chunk-size",
        "1",
        "vm",
        &format!("{host}/first/vm:v1"),
    ]);
    assert!(
        proxy.requests().iter().any(|r| r.method == "PATCH"),
        "chunked upload uses PATCH"
    );
    assert!(home
        .ok(&["list", "--source", "oci", "-q"])
        .contains(&format!("{host}/first/vm:v1")));

    proxy.clear_requests();
    home.ok(&[
        "push",
        "--insecure",
        &format!("{host}/first/vm:v1"),
        &format!("{host}/first/vm:v2"),
    ]);
    assert_eq!(registry.tags("first/vm"), ["v1", "v2"]);
    assert!(
        proxy.requests().iter().all(|r| !r.path.contains("/blobs/")),
        "a re-tag uploads no blobs: {:?}",
        proxy.requests()
    );

    proxy.clear_requests();
    home.ok(&["push", "--insecure", "vm", &format!("{host}/second/vm:v1")]);
    let requests = proxy.requests();
    let mounts: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.method == "POST"
                && r.query
                    .as_deref()
                    .is_some_and(|q| q.contains("mount=") && q.contains("from=first"))
        })
        .collect();
    assert_eq!(mounts.len(), 2, "both disk chunks mounted: {requests:?}");
    assert!(
        requests
            .iter()
            .filter(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/"))
            .count()
            <= 3,
        "only config, NVRAM and OCI config uploaded: {requests:?}"
    );
}

#[test]
fn redirected_blob_downloads_do_not_carry_credentials() {
    let registry = Registry::basic("carol", "pw");
    let (_source, reference, _) = {
        let source = Home::new();
        source.vm_with_data("src", 13);
        let out = source
            .tart()
            .env("TART_REGISTRY_USERNAME", "carol")
            .env("TART_REGISTRY_PASSWORD", "pw")
            .args([
                "push",
                "--insecure",
                "src",
                &format!("{}/redirect/vm:v1", registry.host()),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (source, "redirect/vm:v1".to_owned(), ())
    };
    let cdn = FaultProxy::start(registry.host());
    let front = FaultProxy::start(registry.host());
    front.redirect_blobs_to(cdn.host());
    let home = Home::new();
    let _ = home
        .tart()
        .env("TART_REGISTRY_USERNAME", "carol")
        .env("TART_REGISTRY_PASSWORD", "pw")
        .args(["pull", "--insecure", &format!("{}/{reference}", front.host())])
        .output()
        .unwrap();
    assert!(
        front.requests().iter().any(|r| r.has_authorization()),
        "the registry itself gets credentials"
    );
    let redirected = cdn.requests();
    assert!(!redirected.is_empty(), "blob downloads followed the redirect");
    assert!(redirected.iter().all(|r| !r.has_authorization()), "{redirected:?}");
}

#[test]
fn killed_or_failed_pushes_and_pulls_of_running_vms() {
    let registry = Registry::anonymous();
    let home = Home::new();
    home.vm_with_data("vm", 14);
    let config = home.vm("vm").join("config.json");
    let _running = tart_home::PidLock::try_acquire(&config).unwrap().unwrap();
    // The lock is held by this process; tart, another process, sees the VM running.
    let out = home.run(&["push", "--insecure", "vm", &format!("{}/x/vm:v1", registry.host())]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "VM \"vm\" is running\n");
    let out = home.run(&["pull", "vm"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\"vm\" is a local image, nothing to pull here!\n"
    );
}
