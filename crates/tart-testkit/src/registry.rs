//! Debian's build of the CNCF distribution registry (2.8), one private instance per test.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::{Client, Reply};
use crate::process::Supervised;
use crate::token::{self, random_hex, TokenOptions, TokenRequest, TokenServer};

const BINARY: &str = "/usr/bin/docker-registry";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Another test (or process) may grab the free port between our probe and the registry's bind.
const PORT_ATTEMPTS: usize = 5;
/// Sent on every registry response (via `http.headers`), so the readiness probe can tell our instance from
/// whatever else might be listening on a port that was free a moment ago.
const INSTANCE_HEADER: &str = "X-Tart-Testkit-Instance";

/// Accept header of [`Registry::manifest`]: every manifest and index type a VM image can use.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

enum Auth {
    Anonymous,
    Basic,
    Token(TokenServer),
}

/// A running `docker-registry` on `127.0.0.1:<free port>` with its storage in a private temporary
/// directory. Killed on drop, and by the kernel if the test process dies first; one kept in a `static`
/// for several tests lives until the test process exits (its temporary directory is then left behind).
///
/// The helper methods authenticate like a real client and panic on any unexpected answer, so they read
/// as assertions.
pub struct Registry {
    host: String,
    credentials: Option<(String, String)>,
    client: Client,
    // Field order matters: the process must die before its storage directory is removed.
    _process: Supervised,
    auth: Auth,
    _dir: TempDir,
}

impl Registry {
    /// A registry that needs no credentials.
    pub fn anonymous() -> Registry {
        Registry::start(Auth::Anonymous, None)
    }

    /// A registry with htpasswd (HTTP Basic) authentication for a single user.
    pub fn basic(user: &str, password: &str) -> Registry {
        Registry::start(Auth::Basic, Some((user, password)))
    }

    /// A registry with Docker token authentication, backed by an in-process token server.
    pub fn token(user: &str, password: &str) -> Registry {
        Registry::token_with(user, password, TokenOptions::default())
    }

    /// Like [`Registry::token`], with a configurable token lifetime and anonymous pulls.
    pub fn token_with(user: &str, password: &str, options: TokenOptions) -> Registry {
        Registry::start(
            Auth::Token(TokenServer::start(user, password, options)),
            Some((user, password)),
        )
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// The user and password of a `basic` or `token` registry.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The token server's endpoint of a `token` registry.
    pub fn token_realm(&self) -> Option<String> {
        match &self.auth {
            Auth::Token(server) => Some(server.realm()),
            _ => None,
        }
    }

    /// Every request the token server has answered so far (empty for other modes), e.g. to count refreshes.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        match &self.auth {
            Auth::Token(server) => server.requests(),
            _ => Vec::new(),
        }
    }

    /// The manifest's bytes and `Content-Type`; panics unless the registry has it.
    pub fn manifest(&self, repo: &str, reference: &str) -> (Vec<u8>, String) {
        let reply = self.expect(
            200,
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", MANIFEST_TYPES)],
            None,
        );
        let content_type = reply.header("content-type").unwrap_or_default().to_owned();
        (reply.body, content_type)
    }

    /// The blob's bytes; panics unless the registry has it.
    pub fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        self.expect(200, "GET", &format!("/v2/{repo}/blobs/{digest}"), &[], None)
            .body
    }

    /// The repository's tags, in the registry's order; empty if the repository does not exist.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let reply = self
            .client
            .send("GET", &format!("{}/v2/{repo}/tags/list", self.url()), &[], None);
        if reply.status == 404 {
            return Vec::new();
        }
        assert_eq!(
            reply.status,
            200,
            "GET tags of {repo} on {}: {}",
            self.host,
            reply.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("tags list is JSON");
        json["tags"]
            .as_array()
            .map(|tags| tags.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// Uploads `data` as a blob (monolithic upload: POST, then PUT with the digest) and returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = crate::sha256_digest(data);
        let started = self.expect(202, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None);
        let location = started.header("location").expect("upload Location header");
        let location = if location.starts_with('/') {
            format!("{}{location}", self.url())
        } else {
            location.to_owned()
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={}", digest.replace(':', "%3A"));
        let reply = self
            .client
            .send("PUT", &url, &[("Content-Type", "application/octet-stream")], Some(data));
        assert_eq!(
            reply.status,
            201,
            "PUT blob {digest} to {repo} on {}: {}",
            self.host,
            reply.text()
        );
        digest
    }

    /// Stores a manifest under `reference` (a tag or its digest) and returns its digest.
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) -> String {
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.expect(201, "PUT", &path, &[("Content-Type", media_type)], Some(manifest));
        crate::sha256_digest(manifest)
    }

    fn expect(&self, status: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        let reply = self
            .client
            .send(method, &format!("{}{path}", self.url()), headers, body);
        assert_eq!(
            reply.status,
            status,
            "{method} {path} on {}: {}",
            self.host,
            reply.text()
        );
        reply
    }

    fn start(auth: Auth, credentials: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("tart-testkit-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let auth_config = match &auth {
            Auth::Anonymous => String::new(),
            Auth::Basic => {
                let (user, password) = credentials.expect("basic auth has credentials");
                // bcrypt is the only hash distribution's htpasswd accepts; the minimum cost keeps startup fast.
                let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
                let htpasswd = dir.path().join("htpasswd");
                fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: tart-testkit\n    path: {}\n",
                    yaml_path(&htpasswd)
                )
            }
            Auth::Token(server) => {
                let bundle = dir.path().join("token-root.pem");
                fs::write(&bundle, server.cert_pem()).expect("write token root certificate");
                format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    yaml_string(&server.realm()),
                    yaml_string(token::SERVICE),
                    yaml_string(token::ISSUER),
                    yaml_path(&bundle)
                )
            }
        };
        let log_path = dir.path().join("registry.log");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let instance = random_hex(8);
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n  headers:\n    {INSTANCE_HEADER}: [{instance}]\n\
                 {auth_config}",
                storage = yaml_path(&dir.path().join("storage")),
                secret = random_hex(16),
            );
            let config_path = dir.path().join("config.yml");
            fs::write(&config_path, config).expect("write registry config");
            let process = Supervised::spawn(registry_command(&config_path, &log_path)).unwrap_or_else(|e| {
                panic!("cannot run {BINARY} ({e}); install it with `apt-get install docker-registry` (scripts/setup)")
            });
            let host = format!("127.0.0.1:{port}");
            match wait_ready(&host, &instance, &process, &log_path) {
                Ready::Yes => {
                    let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
                    let client = Client::new(credentials.clone());
                    return Registry {
                        host,
                        credentials,
                        client,
                        _process: process,
                        auth,
                        _dir: dir,
                    };
                }
                Ready::PortTaken => continue,
                Ready::No(why) => {
                    drop(process);
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    panic!("docker-registry on {host} {why}; its stderr:\n{log}");
                }
            }
        }
        panic!("docker-registry: no free port after {PORT_ATTEMPTS} attempts");
    }
}

fn registry_command(config: &Path, log: &Path) -> Command {
    let log = fs::File::create(log).expect("create registry log");
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .arg(config)
        // REGISTRY_* variables would override the generated config.
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone registry log"))
        // A file rather than a pipe: nobody drains a pipe while tests run, and a full one blocks the registry.
        .stderr(log);
    command
}

enum Ready {
    Yes,
    PortTaken,
    No(String),
}

fn wait_ready(host: &str, instance: &str, process: &Supervised, log_path: &Path) -> Ready {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let deadline = Instant::now() + READY_TIMEOUT;
    let url = format!("http://{host}/v2/");
    while Instant::now() < deadline {
        if let Some(status) = process.exit_status() {
            let log = fs::read_to_string(log_path).unwrap_or_default();
            return if log.contains("address already in use") {
                Ready::PortTaken
            } else {
                Ready::No(format!("exited ({status})"))
            };
        }
        // Any answer from our instance counts, a 401 included: it means the API is being served.
        if let Ok(response) = agent.get(&url).call() {
            if response.headers().get(INSTANCE_HEADER).is_some_and(|v| v == instance) {
                return Ready::Yes;
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ready::No(format!("did not answer GET /v2/ within {READY_TIMEOUT:?}"))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    listener.local_addr().expect("ephemeral port").port()
}

/// A JSON string literal is also a valid double-quoted YAML scalar.
fn yaml_string(value: &str) -> String {
    serde_json::to_string(value).expect("string serializes")
}

fn yaml_path(path: &Path) -> String {
    yaml_string(path.to_str().expect("temp dir path is UTF-8"))
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}
