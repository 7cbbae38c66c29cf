//! What the registry tests share: a private TART_HOME with `tart` commands run against it, data
//! and VMs to push, and Tart images assembled by hand in a registry.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use assert_cmd::prelude::*;
use serde_json::{json, Value};
use tart_testkit::{sha256_digest, ProxiedRequest, Registry};

pub const MIB: u64 = 1 << 20;
/// Tart's disk chunk: 512 MiB of uncompressed disk per layer.
pub const CHUNK: u64 = 512 * MIB;
/// A disk of one small chunk.
pub const SMALL_DISK: u64 = 8 * MIB;
/// `tart create --disk-size 1`: two chunks, the second one 463 MiB and not a multiple of 4 KiB.
pub const TWO_CHUNK_DISK: u64 = 1_000_000_000;
/// How long one `tart` command may take before the test gives up on it.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.cirruslabs.tart.config.v1";
pub const DISK_V2: &str = "application/vnd.cirruslabs.tart.disk.v2";
pub const DISK_V1: &str = "application/vnd.cirruslabs.tart.disk.v1";
pub const NVRAM_TYPE: &str = "application/vnd.cirruslabs.tart.nvram.v1";
pub const UNCOMPRESSED_SIZE: &str = "org.cirruslabs.tart.uncompressed-size";
pub const UNCOMPRESSED_DIGEST: &str = "org.cirruslabs.tart.uncompressed-content-digest";
pub const DISK_SIZE_ANNOTATION: &str = "org.cirruslabs.tart.uncompressed-disk-size";
pub const UPLOAD_TIME: &str = "org.cirruslabs.tart.upload-time";
pub const DISK_FORMAT_LABEL: &str = "org.cirruslabs.tart.disk.format";

/// Variables of the caller's environment that would change what `tart` does here.
pub const SCRUBBED_ENV: &[&str] = &[
    "TART_REGISTRY_USERNAME",
    "TART_REGISTRY_PASSWORD",
    "TART_REGISTRY_HOSTNAME",
    "TART_REGISTRY_CA_CERT",
    "DOCKER_CONFIG",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

// ---------------------------------------------------------------------------------------------
// Running tart
// ---------------------------------------------------------------------------------------------

/// A private `TART_HOME` and `HOME` (so no real `~/.docker/config.json` is read).
pub struct Home {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A `tart` process whose output is drained while it runs.
pub struct Running {
    child: Child,
    what: String,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    pub fn finish(mut self) -> Out {
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not finish within {COMMAND_LIMIT:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = |handle: Option<JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&handle.unwrap().join().unwrap()).into_owned()
        };
        Out {
            status,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
        }
    }

    pub fn kill(mut self) -> Out {
        self.child.kill().unwrap(); // SIGKILL
        self.finish()
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut data = Vec::new();
        let _ = pipe.read_to_end(&mut data);
        data
    })
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tart-home");
        fs::create_dir(dir.path().join("user-home")).unwrap();
        Home { dir, root }
    }

    pub fn tart(&self) -> Command {
        let mut cmd = Command::cargo_bin("tart").unwrap();
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("TART_HOME", &self.root)
            .env("HOME", self.dir.path().join("user-home"))
            .env("CI", "1")
            .env("NO_PROXY", "*")
            // Pruning would delete cached images that some tests count on.
            .env("TART_NO_AUTO_PRUNE", "1");
        cmd
    }

    pub fn spawn_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Running {
        let mut cmd = self.tart();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input).unwrap();
        }
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        Running {
            child,
            what: format!("tart {}", args.join(" ")),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    pub fn spawn(&self, args: &[&str]) -> Running {
        self.spawn_with(args, &[], None)
    }

    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Out {
        self.spawn_with(args, env, stdin).finish()
    }

    /// Runs tart and expects success; returns its output.
    pub fn ok_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let out = self.run_with(args, env, None);
        assert!(
            out.status.success(),
            "tart {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> Out {
        self.ok_with(args, &[])
    }

    /// Runs tart and expects it to fail; returns its output.
    pub fn fail_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let out = self.run_with(args, env, None);
        assert!(
            !out.status.success(),
            "tart {} should have failed:\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out
    }

    pub fn fail(&self, args: &[&str]) -> Out {
        self.fail_with(args, &[])
    }

    pub fn vm(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.vm(name).join("disk.img")
    }

    pub fn oci(&self) -> PathBuf {
        self.root.join("cache").join("OCIs")
    }

    /// `cache/OCIs/<host with %3A>/<namespace>`.
    pub fn repo_dir(&self, host: &str, namespace: &str) -> PathBuf {
        self.oci().join(host.replace(':', "%3A")).join(namespace)
    }

    pub fn image_dir(&self, host: &str, namespace: &str, digest: &str) -> PathBuf {
        self.repo_dir(host, namespace).join(digest)
    }

    /// Names listed by `tart list --source oci --format json`.
    pub fn oci_names(&self) -> Vec<String> {
        let out = self.ok(&["list", "--source", "oci", "--format", "json"]);
        let list: Value = serde_json::from_str(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["Source"], "OCI");
                e["Name"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    /// Digest directories and tag symlinks anywhere under `cache/OCIs` (empty if it is absent).
    pub fn cache_entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else { return };
            for entry in entries {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if meta.is_symlink() || name.starts_with("sha256:") {
                    found.push(path);
                } else if meta.is_dir() {
                    walk(&path, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.oci(), &mut found);
        found
    }

    /// The staging directory of a pull of the image with this manifest digest.
    pub fn pull_staging(&self, manifest_digest: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("pull-{}", manifest_digest.trim_start_matches("sha256:")))
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Deterministic, incompressible bytes (xorshift64*), different for every seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
}

pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buffer = vec![0u8; len as usize];
    File::open(path).unwrap().read_exact_at(&mut buffer, offset).unwrap();
    buffer
}

/// Files equal byte for byte (compared in pieces: disks can be large).
pub fn assert_same_file(actual: &Path, expected: &Path) {
    let (a, b) = (File::open(actual).unwrap(), File::open(expected).unwrap());
    let len = b.metadata().unwrap().len();
    assert_eq!(
        a.metadata().unwrap().len(),
        len,
        "{} and {} differ in size",
        actual.display(),
        expected.display()
    );
    let mut buf_a = vec![0u8; 8 << 20];
    let mut buf_b = vec![0u8; 8 << 20];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(buf_a.len() as u64) as usize;
        a.read_exact_at(&mut buf_a[..n], offset).unwrap();
        b.read_exact_at(&mut buf_b[..n], offset).unwrap();
        if buf_a[..n] != buf_b[..n] {
            let at = buf_a[..n].iter().zip(&buf_b[..n]).position(|(x, y)| x != y).unwrap();
            panic!(
                "{} differs from {} at byte {}",
                actual.display(),
                expected.display(),
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

pub fn assert_file_is(actual: &Path, expected: &[u8]) {
    let data = fs::read(actual).unwrap();
    assert!(
        data.len() == expected.len() && data == expected,
        "{} ({} bytes) is not the expected {} bytes",
        actual.display(),
        data.len(),
        expected.len()
    );
}

/// `tart create --linux --disk-size 1 <name>`, its disk cut to `disk_len` bytes if shorter, and
/// random data written at each `(offset, length, seed)`.
pub fn make_vm(home: &Home, name: &str, disk_len: u64, patches: &[(u64, usize, u64)]) {
    home.ok(&["create", "--linux", "--disk-size", "1", name]);
    let disk = home.disk(name);
    assert_eq!(fs::metadata(&disk).unwrap().len(), TWO_CHUNK_DISK);
    if disk_len < TWO_CHUNK_DISK {
        let file = OpenOptions::new().write(true).open(&disk).unwrap();
        file.set_len(disk_len).unwrap();
    }
    for &(offset, len, seed) in patches {
        assert!(offset + len as u64 <= disk_len);
        write_at(&disk, offset, &random_bytes(len, seed));
    }
}

/// One chunk of 8 MiB with 3 MiB of data: a 3 MB disk layer, big enough to be cut or chunked.
pub fn make_small_vm(home: &Home, name: &str, seed: u64) {
    make_vm(home, name, SMALL_DISK, &[(MIB, 3 << 20, seed)]);
}

/// The 1 GB disk of `tart create`, with data at two places in each chunk (the last ending 123
/// bytes before the unaligned end of the disk).
pub fn make_two_chunk_vm(home: &Home, name: &str, seed: u64) {
    make_vm(
        home,
        name,
        TWO_CHUNK_DISK,
        &[
            (MIB, 2 << 20, seed),
            (300 * MIB, 1 << 20, seed + 1),
            (CHUNK + MIB, 2 << 20, seed + 2),
            (TWO_CHUNK_DISK - MIB - 123, 1 << 20, seed + 3),
        ],
    );
}

/// Compact JSON with sorted keys and `/` escaped as `\/`, the way Swift's `JSONEncoder` (and so
/// Tart) writes manifests.
pub fn swift_json(value: &Value) -> Vec<u8> {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                out.push('{');
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(key).unwrap().replace('/', "\\/"));
                    out.push(':');
                    write(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            Value::String(s) => out.push_str(&serde_json::to_string(s).unwrap().replace('/', "\\/")),
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out.into_bytes()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

pub fn query_pairs(request: &ProxiedRequest) -> Vec<(String, String)> {
    request
        .query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn describe(requests: &[ProxiedRequest]) -> String {
    requests
        .iter()
        .map(|r| {
            format!(
                "{} {}{} -> {}{}",
                r.method,
                r.path,
                r.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default(),
                r.status,
                r.range.as_deref().map(|q| format!(" [Range: {q}]")).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The registry's manifest for `repo:reference`, raw and parsed.
pub fn manifest_of(registry: &Registry, repo: &str, reference: &str) -> (Vec<u8>, Value) {
    let (bytes, _) = registry.manifest(repo, reference);
    let value = serde_json::from_slice(&bytes).unwrap();
    (bytes, value)
}

/// Digests of the disk layers of a parsed manifest, in order.
pub fn disk_layers(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == DISK_V2 || l["mediaType"] == DISK_V1)
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Images assembled by hand
// ---------------------------------------------------------------------------------------------

/// `config.json` and `nvram.bin` of a VM made by `tart create`, for images assembled by hand.
pub fn template_vm_files() -> &'static (Vec<u8>, Vec<u8>) {
    static FILES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FILES.get_or_init(|| {
        let home = Home::new();
        home.ok(&["create", "--linux", "--disk-size", "1", "template"]);
        (
            fs::read(home.vm("template").join("config.json")).unwrap(),
            fs::read(home.vm("template").join("nvram.bin")).unwrap(),
        )
    })
}

/// A Tart image stored in a registry through the plain distribution API.
pub struct Image {
    /// The whole uncompressed disk.
    pub disk: Vec<u8>,
    pub config: Vec<u8>,
    pub nvram: Vec<u8>,
    /// Digests of the disk layers (compressed blobs), in order.
    pub layers: Vec<String>,
    pub digest: String,
}

pub fn descriptor(media_type: &str, data: &[u8], digest: &str, annotations: Value) -> Value {
    json!({"mediaType": media_type, "digest": digest, "size": data.len(), "annotations": annotations})
}

/// Stores config, layers, NVRAM, the stub OCI config and a manifest built from them.
pub fn store_image(registry: &Registry, repo: &str, tag: &str, disk_layers: Vec<Value>, disk: Vec<u8>) -> Image {
    let (config, nvram) = template_vm_files().clone();
    let config_digest = registry.push_blob(repo, &config);
    let nvram_digest = registry.push_blob(repo, &nvram);
    let oci_config = swift_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {DISK_FORMAT_LABEL: "raw"}},
    }));
    let oci_config_digest = registry.push_blob(repo, &oci_config);
    let layers: Vec<String> = disk_layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let mut all_layers = vec![descriptor(CONFIG_TYPE, &config, &config_digest, json!({}))];
    all_layers.extend(disk_layers);
    all_layers.push(descriptor(NVRAM_TYPE, &nvram, &nvram_digest, json!({})));
    let manifest = swift_json(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": OCI_CONFIG_TYPE, "digest": oci_config_digest, "size": oci_config.len()},
        "layers": all_layers,
        "annotations": {
            DISK_SIZE_ANNOTATION: disk.len().to_string(),
            UPLOAD_TIME: "2026-05-12T21:45:18Z",
        },
    }));
    let digest = registry.push_manifest(repo, tag, MANIFEST_TYPE, &manifest);
    Image {
        disk,
        config,
        nvram,
        layers,
        digest,
    }
}

/// A disk.v2 image whose chunks are the given byte strings, each compressed on its own.
pub fn store_v2_image(registry: &Registry, repo: &str, tag: &str, chunks: &[Vec<u8>]) -> Image {
    let mut layers = Vec::new();
    for chunk in chunks {
        let blob = apple_lz4::compress(chunk);
        let digest = registry.push_blob(repo, &blob);
        layers.push(descriptor(
            DISK_V2,
            &blob,
            &digest,
            json!({UNCOMPRESSED_SIZE: chunk.len().to_string(), UNCOMPRESSED_DIGEST: sha256_digest(chunk)}),
        ));
    }
    store_image(registry, repo, tag, layers, chunks.concat())
}

/// A 4 MiB chunk: 3,000,000 random bytes (stored uncompressed by LZ4, so a flipped byte in the
/// middle of the blob lands in data, not in a block header) and zeros.
pub fn data_chunk(seed: u64) -> Vec<u8> {
    let mut chunk = random_bytes(3_000_000, seed);
    chunk.resize(4 << 20, 0);
    chunk
}

/// The usual image of the fault tests: two 4 MiB data chunks.
pub fn store_two_layer_image(registry: &Registry, repo: &str, seed: u64) -> Image {
    store_v2_image(registry, repo, "v1", &[data_chunk(seed), data_chunk(seed + 1)])
}

/// The pulled image is exactly `image`, under `tag` as well as under its digest.
pub fn assert_pulled(home: &Home, host: &str, repo: &str, image: &Image) {
    let dir = home.image_dir(host, repo, &image.digest);
    assert_file_is(&dir.join("disk.img"), &image.disk);
    assert_file_is(&dir.join("config.json"), &image.config);
    assert_file_is(&dir.join("nvram.bin"), &image.nvram);
}

/// Runs `vm` (made from the test guest) with user networking until its serial console says it
/// booted, then stops it with `tart stop`, which must end the run cleanly.
pub fn boot_test_guest(home: &Home, vm: &str) {
    let serial = home.dir.path().join(format!("{vm}.serial.log"));
    let run = home.spawn(&[
        "run",
        "--no-graphics",
        "--net-user",
        "--serial-path",
        serial.to_str().unwrap(),
        vm,
    ]);
    tart_testkit::wait_for_text(&serial, "TART-TEST-GUEST: booted", Duration::from_secs(180));
    home.ok(&["stop", vm]);
    let out = run.finish();
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
}
