//! `push`, `pull`, `clone` of remote names, `login` and `logout`, run as the real `tart` binary
//! against real registries (Debian's `docker-registry` on 127.0.0.1, started by `tart-testkit`),
//! some of them behind a proxy that logs every request and breaks blob downloads on purpose.
//!
//! Images stay small. Tests about what a push produces use VMs made by `tart create --linux
//! --disk-size 1`: a sparse 1 GB disk, so two chunks (512 MiB and 463 MiB) with a few MiB of data,
//! or a disk cut down to one 8 MiB chunk where one layer is enough. Tests about how a pull copes
//! with a misbehaving registry use Tart images assembled here from 4 MiB chunks (the engine
//! follows the `uncompressed-size` annotations, whatever they are), so faults hit small blobs.
//! The engine hashes and compresses every byte of a disk: the workspace builds dependencies
//! optimized even in debug builds, or the 1 GB images would take minutes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tart_testkit::{sha256_digest, FaultProxy, ProxiedRequest, Registry};

mod oci_common;
use oci_common::*;

// ---------------------------------------------------------------------------------------------
// 1. push → registry → pull → list → clone
// ---------------------------------------------------------------------------------------------

#[test]
fn push_two_tags_then_pull_list_and_clone() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let src = Home::new();
    make_two_chunk_vm(&src, "src", 1);
    let v1 = format!("{host}/org/vm:v1");
    let latest = format!("{host}/org/vm:latest");
    let out = src.ok(&["push", "--insecure", "--label", "team=ci", "src", &v1, &latest]);
    assert!(
        out.stdout
            .contains(&format!("pushing src to {host}/org/vm{{:v1,:latest}}...")),
        "{}",
        out.stdout
    );
    for line in [
        "pushing config...",
        "pushing disk... this will take a while...",
        "pushing NVRAM...",
    ] {
        assert!(out.stdout.lines().any(|l| l == line), "no {line:?} in:\n{}", out.stdout);
    }
    assert!(
        !out.stdout.contains('\r') && !out.stdout.contains('\x1b'),
        "CI output is plain lines"
    );

    // The registry: both tags, one manifest of Tart's shape.
    let mut tags = registry.tags("org/vm");
    tags.sort();
    assert_eq!(tags, ["latest", "v1"]);
    let (bytes, content_type) = registry.manifest("org/vm", "v1");
    assert_eq!(content_type, MANIFEST_TYPE);
    assert_eq!(
        registry.manifest("org/vm", "latest").0,
        bytes,
        "both tags name one manifest"
    );
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&swift_json(&manifest)),
        String::from_utf8_lossy(&bytes),
        "the manifest is compact, with sorted keys and escaped slashes"
    );
    assert!(String::from_utf8_lossy(&bytes).contains(r#""mediaType":"application\/vnd.oci.image.manifest.v1+json""#));
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], MANIFEST_TYPE);
    assert_eq!(
        manifest["annotations"][DISK_SIZE_ANNOTATION],
        TWO_CHUNK_DISK.to_string()
    );
    let upload_time = manifest["annotations"][UPLOAD_TIME].as_str().unwrap();
    assert!(
        upload_time.len() == 20
            && upload_time.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                10 => b == b'T',
                13 | 16 => b == b':',
                19 => b == b'Z',
                _ => b.is_ascii_digit(),
            }),
        "upload-time {upload_time:?} is not yyyy-MM-ddTHH:mm:ssZ"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(
        layers
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [CONFIG_TYPE, DISK_V2, DISK_V2, NVRAM_TYPE]
    );
    assert_eq!(layers[0]["annotations"], json!({}));
    assert_eq!(layers[3]["annotations"], json!({}));
    let source_disk = src.disk("src");
    for (index, (offset, len)) in [(0, CHUNK), (CHUNK, TWO_CHUNK_DISK - CHUNK)].into_iter().enumerate() {
        let annotations = &layers[1 + index]["annotations"];
        assert_eq!(annotations[UNCOMPRESSED_SIZE], len.to_string(), "layer {index}");
        assert_eq!(
            annotations[UNCOMPRESSED_DIGEST],
            sha256_digest(&read_range(&source_disk, offset, len)),
            "layer {index}"
        );
        let blob = registry.blob("org/vm", layers[1 + index]["digest"].as_str().unwrap());
        assert_eq!(blob.len() as u64, layers[1 + index]["size"].as_u64().unwrap());
        assert_eq!(&blob[..4], b"bv41", "an Apple LZ4 stream");
    }
    // The VM config layer is the local config.json re-encoded compactly (§4.7), as Tart does.
    let config_blob = registry.blob("org/vm", layers[0]["digest"].as_str().unwrap());
    let vm_config: Value = serde_json::from_slice(&fs::read(src.vm("src").join("config.json")).unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&config_blob).unwrap(), vm_config);
    assert!(!config_blob.contains(&b'\n'), "compact JSON");
    assert_eq!(
        registry.blob("org/vm", layers[3]["digest"].as_str().unwrap()),
        fs::read(src.vm("src").join("nvram.bin")).unwrap()
    );
    assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG_TYPE);
    let oci_config_bytes = registry.blob("org/vm", manifest["config"]["digest"].as_str().unwrap());
    let oci_config: Value = serde_json::from_slice(&oci_config_bytes).unwrap();
    assert_eq!(
        swift_json(&oci_config),
        oci_config_bytes,
        "OCI config is sorted and compact"
    );
    assert_eq!(oci_config["config"]["Labels"][DISK_FORMAT_LABEL], "raw");
    assert_eq!(oci_config["config"]["Labels"]["team"], "ci");
    assert_eq!(oci_config["os"], "linux");
    assert_eq!(oci_config["architecture"], vm_config["arch"]);

    // Pull into another TART_HOME: the cache layout, the files byte for byte.
    let dst = Home::new();
    let out = dst.ok(&["pull", "--insecure", &v1]);
    assert!(out.stdout.starts_with(&format!("pulling {v1}...\n")), "{}", out.stdout);
    assert!(out.stdout.contains("pulling disk ("), "{}", out.stdout);
    assert!(out.stdout.contains("pulling NVRAM..."), "{}", out.stdout);
    assert!(
        !out.stdout.contains('\r') && !out.stdout.contains('\x1b'),
        "CI output is plain lines"
    );
    let digest = sha256_digest(&bytes);
    let image = dst.image_dir(host, "org/vm", &digest);
    assert!(
        image.starts_with(
            dst.oci()
                .join(format!("127.0.0.1%3A{}", host.rsplit(':').next().unwrap()))
        ),
        "{}",
        image.display()
    );
    assert!(image.is_dir(), "{} is missing", image.display());
    let tag = dst.repo_dir(host, "org/vm").join("v1");
    assert!(fs::symlink_metadata(&tag).unwrap().is_symlink());
    assert_eq!(fs::canonicalize(&tag).unwrap(), fs::canonicalize(&image).unwrap());
    assert_same_file(&image.join("disk.img"), &source_disk);
    assert_same_file(&image.join("nvram.bin"), &src.vm("src").join("nvram.bin"));
    assert_eq!(fs::read(image.join("config.json")).unwrap(), config_blob);
    assert_eq!(fs::read(image.join("manifest.json")).unwrap(), bytes);
    assert!(!image.join(".explicitly-pulled").exists(), "pulled by tag");
    assert!(
        !dst.pull_staging(&digest).exists(),
        "the staging directory became the image"
    );
    let digest_name = format!("{host}/org/vm@{digest}");
    assert_eq!(dst.oci_names(), [v1.clone(), digest_name.clone()]);
    let text = dst.ok(&["list", "--source", "oci"]).stdout;
    assert!(text.lines().any(|l| l.starts_with("OCI") && l.contains(&v1)), "{text}");

    // clone makes a working local VM out of it.
    dst.ok(&["clone", &v1, "local"]);
    assert_same_file(&dst.disk("local"), &source_disk);
    assert_same_file(&dst.vm("local").join("nvram.bin"), &src.vm("src").join("nvram.bin"));
    let info: Value = serde_json::from_str(&dst.ok(&["get", "local", "--format", "json"]).stdout).unwrap();
    assert_eq!(info["OS"], "linux");
    assert_eq!(info["State"], "stopped");
    assert_eq!(dst.ok(&["list", "-q", "--source", "local"]).stdout, "local\n");

    // By digest: marked as explicitly pulled; again by tag: nothing to do.
    dst.ok(&["pull", "--insecure", &digest_name]);
    assert!(image.join(".explicitly-pulled").exists());
    let out = dst.ok(&["pull", "--insecure", &v1]);
    assert!(
        out.stdout
            .contains(&format!("{digest_name} image is already cached and linked!")),
        "{}",
        out.stdout
    );
    assert_same_file(&image.join("disk.img"), &source_disk);
}

// ---------------------------------------------------------------------------------------------
// 2. clone of a remote name that is not cached yet
// ---------------------------------------------------------------------------------------------

#[test]
fn clone_of_an_uncached_remote_name_pulls_it_first() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let src = Home::new();
    make_small_vm(&src, "src", 10);
    let name = format!("{host}/org/small:v1");
    src.ok(&["push", "--insecure", "src", &name]);
    let (bytes, _) = registry.manifest("org/small", "v1");
    let digest = sha256_digest(&bytes);

    let dst = Home::new();
    let out = dst.ok(&["clone", "--insecure", &name, "work"]);
    assert!(out.stdout.contains(&format!("pulling {name}...")), "{}", out.stdout);
    assert_same_file(&dst.disk("work"), &src.disk("src"));
    assert_same_file(&dst.vm("work").join("nvram.bin"), &src.vm("src").join("nvram.bin"));
    let image = dst.image_dir(host, "org/small", &digest);
    assert_same_file(&image.join("disk.img"), &src.disk("src"));
    assert_eq!(dst.oci_names(), [name.clone(), format!("{host}/org/small@{digest}")]);

    // Cached now: a second clone needs no registry.
    drop(registry);
    let out = dst.ok(&["clone", &name, "again"]);
    assert!(!out.stdout.contains("pulling"), "{}", out.stdout);
    assert_same_file(&dst.disk("again"), &src.disk("src"));
}

#[test]
fn pull_and_clone_by_digest_into_an_empty_home() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let src = Home::new();
    make_small_vm(&src, "src", 20);
    src.ok(&["push", "--insecure", "src", &format!("{host}/org/vm:v1")]);
    let digest = sha256_digest(&registry.manifest("org/vm", "v1").0);
    let by_digest = format!("{host}/org/vm@{digest}");

    let dst = Home::new();
    let out = dst.ok(&["pull", "--insecure", &by_digest]);
    assert!(
        out.stdout.contains(&format!("pulling {by_digest}...")),
        "{}",
        out.stdout
    );
    let image = dst.image_dir(host, "org/vm", &digest);
    assert!(image.join(".explicitly-pulled").is_file());
    assert_same_file(&image.join("disk.img"), &src.disk("src"));
    assert!(
        !dst.repo_dir(host, "org/vm").join("v1").exists(),
        "a pull by digest creates no tag"
    );
    assert_eq!(dst.oci_names(), [by_digest.as_str()]);
    dst.ok(&["clone", &by_digest, "work"]);
    assert_same_file(&dst.disk("work"), &src.disk("src"));
}

// ---------------------------------------------------------------------------------------------
// 3. credentials
// ---------------------------------------------------------------------------------------------

#[test]
fn basic_auth_login_logout_and_environment_credentials() {
    let registry = Registry::basic("alice", "s3cret");
    let host = registry.host().to_owned();
    let home = Home::new();
    make_small_vm(&home, "vm", 30);
    let v1 = format!("{host}/org/vm:v1");

    // No credentials: a clear refusal.
    let out = home.fail(&["push", "--insecure", "vm", &v1]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&host) && (out.stderr.contains("credentials") || out.stderr.contains("401")),
        "unclear error: {}",
        out.stderr
    );
    assert!(registry.tags("org/vm").is_empty());

    // A wrong password is refused by login and nothing is stored.
    let credentials = home.root.join("credentials.json");
    let login = [
        "login",
        host.as_str(),
        "--username",
        "alice",
        "--password-stdin",
        "--insecure",
    ];
    let out = home.run_with(&login, &[], Some(b"wrong\n"));
    assert_eq!(out.code(), Some(1), "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("invalid credentials"), "{}", out.stderr);
    assert!(
        !fs::read_to_string(&credentials).unwrap_or_default().contains(&host),
        "nothing stored after a failed login"
    );

    // The right one: stored privately, and push and pull work with it.
    let out = home.run_with(&login, &[], Some(b"s3cret\n"));
    assert!(out.status.success(), "login failed: {}", out.stderr);
    assert!(out.stdout.contains("Login succeeded"), "{}", out.stdout);
    let mode = fs::metadata(&credentials).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "credentials.json mode {mode:o}");
    home.ok(&["push", "--insecure", "vm", &v1]);
    assert_eq!(registry.tags("org/vm"), ["v1"]);
    home.ok(&["pull", "--insecure", &v1]);
    let digest = sha256_digest(&registry.manifest("org/vm", "v1").0);
    assert_same_file(
        &home.image_dir(&host, "org/vm", &digest).join("disk.img"),
        &home.disk("vm"),
    );

    // Another home has no credentials.
    let other = Home::new();
    let out = other.fail(&["pull", "--insecure", &v1]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(other.cache_entries().is_empty());

    // Logout forgets them.
    home.ok(&["logout", &host]);
    assert!(
        !fs::read_to_string(&credentials).unwrap_or_default().contains(&host),
        "logout removes the stored credentials"
    );
    home.fail(&["push", "--insecure", "vm", &format!("{host}/org/vm:v2")]);

    // Environment credentials, used only for the host they name.
    let env = [
        ("TART_REGISTRY_USERNAME", "alice"),
        ("TART_REGISTRY_PASSWORD", "s3cret"),
    ];
    home.ok_with(&["push", "--insecure", "vm", &format!("{host}/org/vm:v2")], &env);
    let elsewhere = [env[0], env[1], ("TART_REGISTRY_HOSTNAME", "registry.example.com")];
    let out = home.fail_with(&["push", "--insecure", "vm", &format!("{host}/org/vm:v3")], &elsewhere);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    let here = [env[0], env[1], ("TART_REGISTRY_HOSTNAME", host.as_str())];
    home.ok_with(&["push", "--insecure", "vm", &format!("{host}/org/vm:v3")], &here);
    let mut tags = registry.tags("org/vm");
    tags.sort();
    assert_eq!(tags, ["v1", "v2", "v3"]);

    let fresh = Home::new();
    fresh.fail_with(&["pull", "--insecure", &v1], &elsewhere);
    assert!(fresh.cache_entries().is_empty());
    fresh.ok_with(&["pull", "--insecure", &v1], &env);
    assert_same_file(
        &fresh.image_dir(&host, "org/vm", &digest).join("disk.img"),
        &home.disk("vm"),
    );
}

#[test]
fn token_auth_push_and_pull_with_environment_credentials() {
    let registry = Registry::token("bob", "hunter2");
    let host = registry.host().to_owned();
    let env = [("TART_REGISTRY_USERNAME", "bob"), ("TART_REGISTRY_PASSWORD", "hunter2")];
    let src = Home::new();
    make_small_vm(&src, "vm", 40);
    let name = format!("{host}/org/vm:v1");

    let out = src.fail(&["push", "--insecure", "vm", &name]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    src.ok_with(&["push", "--insecure", "vm", &name], &env);
    assert_eq!(registry.tags("org/vm"), ["v1"]);
    let pushes = registry.token_requests();
    assert!(
        pushes.iter().any(|r| r.granted
            && r.user.as_deref() == Some("bob")
            && r.scopes
                .iter()
                .any(|s| s.starts_with("repository:org/vm:") && s.contains("push"))),
        "no push token was issued: {pushes:?}"
    );

    let dst = Home::new();
    dst.fail(&["pull", "--insecure", &name]);
    dst.ok_with(&["pull", "--insecure", &name], &env);
    let digest = sha256_digest(&registry.manifest("org/vm", "v1").0);
    assert_same_file(
        &dst.image_dir(&host, "org/vm", &digest).join("disk.img"),
        &src.disk("vm"),
    );
    let pulls = &registry.token_requests()[pushes.len()..];
    assert!(
        pulls
            .iter()
            .any(|r| r.granted && r.user.as_deref() == Some("bob") && r.scopes.iter().any(|s| s.contains("org/vm"))),
        "no pull token was issued: {pulls:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4.-8. a misbehaving registry
// ---------------------------------------------------------------------------------------------

#[test]
fn corrupted_layer_fails_verification_and_only_it_is_fetched_again() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_two_layer_image(&registry, "org/vm", 50);
    let name = format!("{host}/org/vm:v1");
    let (good, bad) = (&image.layers[0], &image.layers[1]);

    proxy.corrupt_blob(bad);
    let home = Home::new();
    // One layer at a time, so the good layer is complete before the bad one fails.
    let out = home.fail(&["pull", "--insecure", "--concurrency", "1", &name]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("failed verification"), "{}", out.stderr);
    assert!(
        out.stderr.contains(bad.as_str()),
        "the error names the layer: {}",
        out.stderr
    );
    assert_eq!(home.cache_entries(), Vec::<PathBuf>::new(), "nothing reaches the cache");
    assert_eq!(proxy.blob_gets(good).len(), 1);
    assert_eq!(proxy.blob_gets(bad).len(), 1, "a corrupt blob is not retried");

    proxy.clear_faults();
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/vm", &image);
    assert_eq!(
        proxy.blob_gets(good).len(),
        1,
        "the verified layer was kept:\n{}",
        describe(&proxy.requests())
    );
    assert_eq!(proxy.blob_gets(bad).len(), 2);
}

#[test]
fn manifest_with_a_wrong_uncompressed_digest_fails_verification() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let chunk = data_chunk(55);
    let blob = apple_lz4::compress(&chunk);
    let digest = registry.push_blob("org/vm", &blob);
    let lie = sha256_digest(b"something else");
    let layer = descriptor(
        DISK_V2,
        &blob,
        &digest,
        json!({UNCOMPRESSED_SIZE: chunk.len().to_string(), UNCOMPRESSED_DIGEST: lie}),
    );
    store_image(&registry, "org/vm", "v1", vec![layer], chunk);
    let home = Home::new();
    let out = home.fail(&["pull", "--insecure", &format!("{host}/org/vm:v1")]);
    assert!(out.stderr.contains("failed verification"), "{}", out.stderr);
    assert!(home.cache_entries().is_empty());
}

#[test]
fn dropped_connection_resumes_the_blob_with_range() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_two_layer_image(&registry, "org/vm", 60);
    let cut = &image.layers[1];
    proxy.truncate_blob_after(cut, 1_000_000, 1);

    let home = Home::new();
    home.ok(&["pull", "--insecure", &format!("{host}/org/vm:v1")]);
    assert_pulled(&home, host, "org/vm", &image);
    let gets = proxy.blob_gets(cut);
    assert_eq!(gets.len(), 2, "{}", describe(&gets));
    let resumed_at = range_start(&gets[1]);
    assert!(
        resumed_at.is_some_and(|k| k > 0 && k <= 1_000_000),
        "second GET should resume with Range: bytes=<k>-, got {}",
        describe(&gets)
    );
    assert_eq!(proxy.blob_gets(&image.layers[0]).len(), 1);
}

/// A two-layer image behind a proxy whose downloads of the second layer announce a
/// `Content-Length` off by `delta`: the pull fails with an error naming the blob and leaves the
/// cache alone, or succeeds with exactly the right image. Either way it never asks for a range
/// past the end of the blob, and once the registry is honest again the same home pulls the right
/// image. Returns the output of the first pull.
fn pull_from_a_registry_lying_about_content_length(delta: i64, seed: u64) -> Out {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_two_layer_image(&registry, "org/vm", seed);
    let name = format!("{host}/org/vm:v1");
    let lied = &image.layers[1];
    let size = registry.blob("org/vm", lied).len() as u64;
    proxy.lie_content_length(lied, delta);

    let home = Home::new();
    let out = home.run_with(&["pull", "--insecure", &name], &[], None);
    let gets = proxy.blob_gets(lied);
    eprintln!(
        "pull with Content-Length off by {delta}: {}\n{}\n{}",
        out.status,
        out.stderr,
        describe(&gets)
    );
    if out.status.success() {
        assert_pulled(&home, host, "org/vm", &image);
    } else {
        assert!(out.stderr.contains(lied.as_str()), "unclear error: {}", out.stderr);
        assert_eq!(home.cache_entries(), Vec::<PathBuf>::new(), "nothing reaches the cache");
    }
    // Once every byte has arrived there is nothing left to ask for: `bytes=<size>-` can only
    // be answered 416.
    let past_end: Vec<ProxiedRequest> = gets
        .iter()
        .filter(|r| range_start(r).is_some_and(|start| start >= size))
        .cloned()
        .collect();
    assert!(
        past_end.is_empty(),
        "asked for bytes past the end of the {size}-byte blob:\n{}\ntart said:\n{}",
        describe(&past_end),
        out.stderr
    );

    proxy.clear_faults();
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/vm", &image);
    out
}

/// `k` of a `Range: bytes=k-` header.
fn range_start(request: &ProxiedRequest) -> Option<u64> {
    request
        .range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

#[test]
fn registry_announcing_too_few_bytes_never_yields_a_wrong_image() {
    // Every download of the blob looks cut short, resumed ones too: the pull cannot succeed, and
    // its final error should say so, not blame the data.
    let out = pull_from_a_registry_lying_about_content_length(-1000, 70);
    assert!(!out.status.success());
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("connection ended") && !last.contains("decompress"),
        "the final error hides that the download was cut short: {last:?}"
    );
}

#[test]
fn registry_announcing_too_many_bytes_never_yields_a_wrong_image() {
    // Every byte arrives, then the connection ends before the announced length.
    pull_from_a_registry_lying_about_content_length(1000, 75);
}

#[test]
fn killed_pull_resumes_without_fetching_the_finished_layer_again() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_two_layer_image(&registry, "org/vm", 80);
    let name = format!("{host}/org/vm:v1");
    let (first, second) = (&image.layers[0], &image.layers[1]);
    proxy.delay_blob(second, Duration::from_secs(60));

    let home = Home::new();
    let pull = home.spawn(&["pull", "--insecure", &name]);
    let journal = home.pull_staging(&image.digest).join("disk-layers.done");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Both, in either order: on a busy machine layer 0 can be journaled before the proxy has
    // the registry's answer for the second layer (it logs a request once the answer's head is
    // there).
    while !fs::read_to_string(&journal).is_ok_and(|done| done.lines().any(|l| l.trim() == "0"))
        || proxy.blob_gets(second).is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "layer 0 never finished, or the second never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.blob_gets(second).len(), 1, "the second layer is mid-way");
    let out = pull.kill();
    assert!(!out.status.success());
    assert_eq!(home.cache_entries(), Vec::<PathBuf>::new(), "nothing reaches the cache");
    assert!(journal.exists(), "the staging directory is kept for the next attempt");

    proxy.clear_faults();
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/vm", &image);
    assert_eq!(proxy.blob_gets(first).len(), 1, "{}", describe(&proxy.requests()));
    assert_eq!(proxy.blob_gets(second).len(), 2);
    assert!(!home.pull_staging(&image.digest).exists());
}

#[test]
fn concurrent_pulls_of_one_image_download_each_blob_once() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let image = store_v2_image(
        &registry,
        "org/vm",
        "v1",
        &[data_chunk(90), data_chunk(91), data_chunk(92)],
    );
    let name = format!("{host}/org/vm:v1");
    // Slow enough that the two pulls overlap.
    proxy.delay_blob(&image.layers[2], Duration::from_secs(2));

    let home = Home::new();
    let a = home.spawn(&["pull", "--insecure", &name]);
    let b = home.spawn(&["pull", "--insecure", &name]);
    for out in [a.finish(), b.finish()] {
        assert!(out.status.success(), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    }
    assert_pulled(&home, host, "org/vm", &image);
    for layer in &image.layers {
        assert_eq!(
            proxy.blob_gets(layer).len(),
            1,
            "blob {layer}:\n{}",
            describe(&proxy.requests())
        );
    }
    assert_eq!(home.oci_names(), [name, format!("{host}/org/vm@{}", image.digest)]);
}

/// CI hosts run several jobs at once, each pulling first: pulls of one image under several
/// tags and of other images, all at once into one home, must all succeed and leave every tag
/// pointing at its image (an image moved into the cache is linked before any other pull's
/// garbage collection can see it).
#[test]
fn simultaneous_pulls_of_images_and_tags_into_one_home_all_succeed() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let one = store_v2_image(&registry, "org/vm", "v1", &[data_chunk(93)]);
    let (manifest, _) = registry.manifest("org/vm", "v1");
    registry.push_manifest("org/vm", "also", MANIFEST_TYPE, &manifest);
    let other = store_v2_image(&registry, "org/other", "v1", &[data_chunk(94)]);
    for round in 0..4 {
        let home = Home::new();
        let names = [
            format!("{host}/org/vm:v1"),
            format!("{host}/org/vm:v1"),
            format!("{host}/org/vm:also"),
            format!("{host}/org/other:v1"),
        ];
        let pulls: Vec<_> = names
            .iter()
            .map(|name| home.spawn(&["pull", "--insecure", name]))
            .collect();
        for (name, pull) in names.iter().zip(pulls) {
            let out = pull.finish();
            assert!(
                out.status.success(),
                "round {round}, {name}:\n{}{}",
                out.stdout,
                out.stderr
            );
        }
        assert_pulled(&home, host, "org/vm", &one);
        assert_pulled(&home, host, "org/other", &other);
        let mut expected = vec![
            format!("{host}/org/other:v1"),
            format!("{host}/org/other@{}", other.digest),
            format!("{host}/org/vm:also"),
            format!("{host}/org/vm:v1"),
            format!("{host}/org/vm@{}", one.digest),
        ];
        expected.sort();
        let mut names = home.oci_names();
        names.sort();
        assert_eq!(names, expected, "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// 9.-10. images that are not (current) Tart images
// ---------------------------------------------------------------------------------------------

#[test]
fn container_images_and_malformed_digests_are_refused() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = random_bytes(4096, 100);
    let config_digest = registry.push_blob("library/debian", config);
    let layer_digest = registry.push_blob("library/debian", &layer);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": OCI_CONFIG_TYPE, "digest": config_digest, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    registry.push_manifest(
        "library/debian",
        "latest",
        MANIFEST_TYPE,
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let home = Home::new();
    let out = home.fail(&["pull", "--insecure", &format!("{host}/library/debian:latest")]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    // A container image is pulled as a KubeVirt containerDisk now; this one's layer is no tar.
    assert!(out.stderr.contains(&layer_digest), "{}", out.stderr);
    assert!(home.cache_entries().is_empty());

    let out = home.fail(&["pull", "--insecure", &format!("{host}/library/debian@sha256:xyz")]);
    assert!(out.stderr.contains("failed to parse remote name"), "{}", out.stderr);
    assert!(home.cache_entries().is_empty());
}

#[test]
fn legacy_disk_v1_images_are_reassembled_byte_for_byte() {
    let registry = Registry::anonymous();
    let host = registry.host();
    let mut disk = vec![0u8; 6 << 20];
    disk[..2 << 20].copy_from_slice(&random_bytes(2 << 20, 110));
    disk[(4 << 20) + 12345..(5 << 20) + 12345].copy_from_slice(&random_bytes(1 << 20, 111));
    // One stream for the whole disk, cut into two layers at an arbitrary byte.
    let stream = apple_lz4::compress(&disk);
    let cut = stream.len() / 2 + 7;
    let mut layers = Vec::new();
    for piece in [&stream[..cut], &stream[cut..]] {
        let digest = registry.push_blob("org/old", piece);
        layers.push(descriptor(DISK_V1, piece, &digest, json!({})));
    }
    let image = store_image(&registry, "org/old", "v1", layers, disk);
    let name = format!("{host}/org/old:v1");
    let home = Home::new();
    home.ok(&["pull", "--insecure", &name]);
    assert_pulled(&home, host, "org/old", &image);
    home.ok(&["clone", &name, "old"]);
    assert_file_is(&home.disk("old"), &image.disk);
}

// ---------------------------------------------------------------------------------------------
// 11. chunks that need no download
// ---------------------------------------------------------------------------------------------

#[test]
fn chunks_of_cached_images_and_zero_chunks_are_not_downloaded() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let src = Home::new();
    make_two_chunk_vm(&src, "a", 120);
    src.ok(&["clone", "a", "b"]);
    write_at(&src.disk("b"), CHUNK + 2 * MIB, &random_bytes(2 << 20, 121));
    let (a_name, b_name) = (format!("{host}/org/a:v1"), format!("{host}/org/b:v1"));
    src.ok(&["push", "--insecure", "a", &a_name]);
    src.ok(&["push", "--insecure", "b", &b_name]);
    let (a_bytes, a_manifest) = manifest_of(&registry, "org/a", "v1");
    let (b_bytes, b_manifest) = manifest_of(&registry, "org/b", "v1");
    let (a_layers, b_layers) = (disk_layers(&a_manifest), disk_layers(&b_manifest));
    assert_eq!(a_layers[0], b_layers[0], "chunk 0 is the same");
    assert_ne!(a_layers[1], b_layers[1], "chunk 1 differs");

    let dst = Home::new();
    dst.ok(&["pull", "--insecure", &a_name]);
    let out = dst.ok(&["pull", "--insecure", &b_name]);
    let b_image = dst.image_dir(host, "org/b", &sha256_digest(&b_bytes));
    assert_same_file(&b_image.join("disk.img"), &src.disk("b"));
    assert_same_file(
        &dst.image_dir(host, "org/a", &sha256_digest(&a_bytes)).join("disk.img"),
        &src.disk("a"),
    );
    let gets = |digest: &str| proxy.blob_gets(digest).len();
    assert_eq!(
        gets(&a_layers[0]),
        1,
        "chunk 0 came from the cached image A:\n{}",
        out.stderr
    );
    assert_eq!(gets(&a_layers[1]), 1);
    assert_eq!(gets(&b_layers[1]), 1);

    // A chunk of zeros (the untouched second chunk of a new disk) is never fetched.
    make_vm(&src, "zeros", TWO_CHUNK_DISK, &[(10 * MIB, 2 << 20, 122)]);
    let zeros_name = format!("{host}/org/zeros:v1");
    src.ok(&["push", "--insecure", "zeros", &zeros_name]);
    let (z_bytes, z_manifest) = manifest_of(&registry, "org/zeros", "v1");
    let z_layers = disk_layers(&z_manifest);
    assert_eq!(z_layers.len(), 2);
    dst.ok(&["pull", "--insecure", &zeros_name]);
    assert_eq!(gets(&z_layers[0]), 1, "chunk 0 has data");
    assert_eq!(gets(&z_layers[1]), 0, "{}", describe(&proxy.requests()));
    let z_image = dst.image_dir(host, "org/zeros", &sha256_digest(&z_bytes));
    assert_same_file(&z_image.join("disk.img"), &src.disk("zeros"));
}

// ---------------------------------------------------------------------------------------------
// 12. push: re-tag, populate the cache, chunked uploads, cross-repository mounts
// ---------------------------------------------------------------------------------------------

fn is_blob_upload(request: &ProxiedRequest) -> bool {
    matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") && request.path.contains("/blobs/")
}

#[test]
fn retag_populate_cache_chunked_upload_and_cross_repository_mount() {
    let registry = Registry::anonymous();
    let proxy = FaultProxy::start(registry.host());
    let host = proxy.host();
    let home = Home::new();
    make_small_vm(&home, "vm", 130);
    let v1 = format!("{host}/org/vm:v1");

    // --populate-cache: the pushed image is in the cache, as if pulled.
    home.ok(&["push", "--insecure", "--populate-cache", "vm", &v1]);
    let (bytes, manifest) = manifest_of(&registry, "org/vm", "v1");
    let digest = sha256_digest(&bytes);
    assert_eq!(home.oci_names(), [v1.clone(), format!("{host}/org/vm@{digest}")]);
    let image = home.image_dir(host, "org/vm", &digest);
    assert_same_file(&image.join("disk.img"), &home.disk("vm"));
    assert_eq!(
        fs::canonicalize(home.repo_dir(host, "org/vm").join("v1")).unwrap(),
        fs::canonicalize(&image).unwrap()
    );

    // Re-tagging a cached image uploads no blob.
    proxy.clear_requests();
    home.ok(&["push", "--insecure", &v1, &format!("{host}/org/vm:v2")]);
    let uploads: Vec<ProxiedRequest> = proxy.requests().into_iter().filter(is_blob_upload).collect();
    assert!(uploads.is_empty(), "re-tag uploaded blobs:\n{}", describe(&uploads));
    assert_eq!(registry.manifest("org/vm", "v2").0, bytes);
    let mut tags = registry.tags("org/vm");
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);

    // Another repository of the same registry: the disk is mounted, not uploaded.
    proxy.clear_requests();
    home.ok(&["push", "--insecure", "vm", &format!("{host}/other/vm:v1")]);
    let disk_digest = &disk_layers(&manifest)[0];
    let requests = proxy.requests();
    let mounted = requests.iter().any(|r| {
        let query = query_pairs(r);
        r.method == "POST"
            && r.path == "/v2/other/vm/blobs/uploads/"
            && query.contains(&("mount".into(), disk_digest.clone()))
            && query.contains(&("from".into(), "org/vm".into()))
    });
    assert!(
        mounted,
        "no mount of {disk_digest} from org/vm:\n{}",
        describe(&requests)
    );
    let uploaded_disk: Vec<ProxiedRequest> = requests
        .iter()
        .filter(|r| {
            matches!(r.method.as_str(), "PUT" | "PATCH")
                && r.path.starts_with("/v2/other/vm/blobs/uploads/")
                && query_pairs(r).contains(&("digest".into(), disk_digest.clone()))
        })
        .cloned()
        .collect();
    assert!(
        uploaded_disk.is_empty(),
        "disk uploaded anyway:\n{}",
        describe(&uploaded_disk)
    );
    assert_eq!(manifest_of(&registry, "other/vm", "v1").1["layers"], manifest["layers"]);
    registry.blob("other/vm", disk_digest);

    // --chunk-size 1: PATCH uploads of at most 1 MB; what arrives is intact.
    make_small_vm(&home, "vm2", 131);
    proxy.clear_requests();
    let chunked = format!("{host}/org/chunked:v1");
    home.ok(&["push", "--insecure", "--chunk-size", "1", "vm2", &chunked]);
    let patches: Vec<ProxiedRequest> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/v2/org/chunked/blobs/uploads/"))
        .collect();
    assert!(
        patches.len() >= 3,
        "expected PATCH uploads:\n{}",
        describe(&proxy.requests())
    );
    let other = Home::new();
    other.ok(&["pull", "--insecure", &chunked]);
    let chunked_digest = sha256_digest(&registry.manifest("org/chunked", "v1").0);
    assert_same_file(
        &other.image_dir(host, "org/chunked", &chunked_digest).join("disk.img"),
        &home.disk("vm2"),
    );
}

// ---------------------------------------------------------------------------------------------
// 13. credentials never follow a redirect to another host
// ---------------------------------------------------------------------------------------------

#[test]
fn redirected_blob_downloads_carry_no_credentials() {
    let registry = Registry::basic("alice", "s3cret");
    let front = FaultProxy::start(registry.host());
    let cdn = FaultProxy::start(registry.host());
    store_two_layer_image(&registry, "org/vm", 140);
    front.redirect_blobs_to(cdn.host());

    let home = Home::new();
    let env = [
        ("TART_REGISTRY_USERNAME", "alice"),
        ("TART_REGISTRY_PASSWORD", "s3cret"),
    ];
    let out = home.run_with(
        &["pull", "--insecure", &format!("{}/org/vm:v1", front.host())],
        &env,
        None,
    );
    let front_log = front.requests();
    assert!(
        front_log.iter().any(|r| r.has_authorization()),
        "credentials were used with the registry itself:\n{}",
        describe(&front_log)
    );
    assert!(
        front_log.iter().any(|r| r.status == 307),
        "blob downloads were redirected:\n{}",
        describe(&front_log)
    );
    let cdn_log = cdn.requests();
    assert!(
        !cdn_log.is_empty(),
        "the redirect was not followed; tart said:\n{}",
        out.stderr
    );
    let leaked: Vec<ProxiedRequest> = cdn_log.iter().filter(|r| r.has_authorization()).cloned().collect();
    assert!(
        leaked.is_empty(),
        "credentials sent to another host:\n{}",
        describe(&leaked)
    );
    if !out.status.success() {
        assert!(home.cache_entries().is_empty());
    }
}

#[test]
fn running_vms_are_not_pushed_and_local_names_are_not_pulled() {
    let registry = Registry::anonymous();
    let home = Home::new();
    make_small_vm(&home, "vm", 40);
    // This test process holds the run lock; tart, another process, sees the VM running.
    let _running = tart_home::PidLock::try_acquire(&home.vm("vm").join("config.json"))
        .unwrap()
        .unwrap();
    let out = home.run_with(
        &["push", "--insecure", "vm", &format!("{}/x/vm:v1", registry.host())],
        &[],
        None,
    );
    assert_eq!(out.code(), Some(2));
    assert_eq!(out.stderr, "VM \"vm\" is running\n");
    let out = home.ok(&["pull", "vm"]);
    assert_eq!(out.stdout, "\"vm\" is a local image, nothing to pull here!\n");
}
