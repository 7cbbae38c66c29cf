//! The registry client: `oci-client` does the distribution protocol and the token dance; this
//! wrapper adds what Tart needs on top (resumable blob streams, HEAD before upload, mounts,
//! PATCH chunk sizes, retries) and turns its errors into messages a user can act on.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference as OciReference, RegistryOperation};
use reqwest::header::HeaderValue;

use crate::manifest::sha256_digest;
use crate::media;

/// How to reach registries, from the command line and the environment.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Plain HTTP (`--insecure`).
    pub insecure: bool,
    /// Extra CA certificates (PEM) trusted besides the system store.
    pub ca_certs: Vec<PathBuf>,
}

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// One repository (`host/namespace`) on one registry.
pub struct Registry {
    client: Client,
    host: String,
    namespace: String,
    auth: RegistryAuth,
    chunked: bool,
    insecure: bool,
    ca_pems: Vec<Vec<u8>>,
}

/// Transport failures are worth another attempt; answers from the registry are not.
pub fn is_transient(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(oci) = cause.downcast_ref::<OciDistributionError>() {
            return match oci {
                OciDistributionError::RequestError(e) => {
                    e.is_timeout() || e.is_connect() || e.is_request() || e.is_body()
                }
                OciDistributionError::IoError(_) => true,
                OciDistributionError::ServerError { code, .. } => *code >= 500,
                _ => false,
            };
        }
        cause.downcast_ref::<reqwest::Error>().is_some_and(|e| !e.is_status())
            || cause.downcast_ref::<std::io::Error>().is_some()
    })
}

impl Registry {
    /// `chunk_size` > 0 makes uploads a series of PATCH requests of at most that many bytes.
    pub fn new(
        host: &str,
        namespace: &str,
        connection: &Connection,
        credentials: Option<Credentials>,
        chunk_size: usize,
    ) -> Result<Self> {
        let mut ca_pems = Vec::new();
        for path in &connection.ca_certs {
            ca_pems.push(
                std::fs::read(path).with_context(|| format!("failed to read CA certificate {}", path.display()))?,
            );
        }
        let extra_root_certificates = ca_pems
            .iter()
            .map(|data| Certificate {
                encoding: CertificateEncoding::Pem,
                data: data.clone(),
            })
            .collect();
        let config = ClientConfig {
            protocol: if connection.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates,
            use_monolithic_push: chunk_size == 0,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("tart-linux/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        Ok(Registry {
            client: Client::new(config),
            host: host.to_owned(),
            namespace: namespace.to_owned(),
            auth: match credentials {
                Some(c) => RegistryAuth::Basic(c.username, c.password),
                None => RegistryAuth::Anonymous,
            },
            chunked: chunk_size > 0,
            insecure: connection.insecure,
            ca_pems,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn reference(&self, reference: &str) -> OciReference {
        if reference.starts_with("sha256:") {
            OciReference::with_digest(self.host.clone(), self.namespace.clone(), reference.to_owned())
        } else {
            OciReference::with_tag(self.host.clone(), self.namespace.clone(), reference.to_owned())
        }
    }

    fn blob_reference(&self) -> OciReference {
        self.reference("latest")
    }

    /// Authenticates for `operation` up front, so a wrong password fails before any work.
    pub async fn authenticate(&self, operation: RegistryOperation) -> Result<()> {
        self.client
            .auth(&self.blob_reference(), &self.auth, operation)
            .await
            .map(drop)
            .map_err(|e| self.describe(e, "authenticating"))
    }

    /// `GET /v2/` with our credentials, as `tart login` does to validate them. Token
    /// registries are checked by fetching a token; Basic ones by the ping itself.
    pub async fn ping(&self) -> Result<()> {
        let scheme = if self.insecure { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/", self.host);
        let mut client = reqwest::Client::builder().connect_timeout(Duration::from_secs(30));
        for pem in &self.ca_pems {
            client = client.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        let client = client.build()?;
        let mut request = client.get(&url);
        if let RegistryAuth::Basic(user, password) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.with_context(|| format!("failed to reach {url}"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let bearer = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("bearer"));
        if status == reqwest::StatusCode::UNAUTHORIZED && bearer {
            return self.authenticate(RegistryOperation::Pull).await;
        }
        bail!("{url} answered HTTP {status}")
    }

    /// The manifest bytes as sent and their digest, computed by us. A manifest fetched by digest
    /// must hash to that digest, or the registry is lying.
    pub async fn manifest(&self, reference: &str) -> Result<(Bytes, String)> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&self.reference(reference), &self.auth, &[media::MANIFEST])
            .await
            .map_err(|e| self.describe(e, &format!("pulling manifest {reference}")))?;
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            bail!("the registry sent a manifest whose digest is {digest}, not the requested {reference}");
        }
        Ok((bytes, digest))
    }

    /// A blob's bytes from `offset` on, and whether the registry honoured the range (if not,
    /// the stream starts at byte 0).
    pub async fn blob_stream(
        &self,
        digest: &str,
        size: u64,
        offset: u64,
    ) -> Result<(BoxStream<'static, std::io::Result<Bytes>>, bool)> {
        let descriptor = oci_client::manifest::OciDescriptor {
            digest: digest.to_owned(),
            size: size as i64,
            ..Default::default()
        };
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        // Always send a Range so that oci-client leaves verification to us: we hash the whole
        // blob across resumed requests, which a per-response check cannot do.
        let response = self
            .client
            .pull_blob_stream_partial(&self.blob_reference(), &descriptor, offset, None)
            .await
            .map_err(|e| self.describe(e, &format!("pulling blob {digest}")))?;
        Ok(match response {
            BlobResponse::Partial(sized) => (sized.stream, true),
            BlobResponse::Full(sized) => (sized.stream, offset == 0),
        })
    }

    /// A small blob, whole and verified.
    pub async fn blob(&self, digest: &str, size: u64) -> Result<Vec<u8>> {
        let (stream, _) = self.blob_stream(digest, size, 0).await?;
        let mut data = Vec::with_capacity(size as usize);
        let mut stream = stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("failed to download blob {digest}"))?;
            if (data.len() + chunk.len()) as u64 > size {
                bail!("the registry sent more than the {size} bytes the manifest declares for blob {digest}");
            }
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 != size {
            bail!(
                "the registry sent {} bytes for blob {digest}, the manifest declares {size}",
                data.len()
            );
        }
        let actual = sha256_digest(&data);
        if actual != digest {
            bail!("blob {digest} failed verification: the registry sent content with digest {actual}");
        }
        Ok(data)
    }

    pub async fn blob_exists(&self, digest: &str) -> Result<bool> {
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        self.client
            .blob_exists(&self.blob_reference(), digest)
            .await
            .map_err(|e| self.describe(e, &format!("checking blob {digest}")))
    }

    /// Asks the registry to link a blob it already has in another repository (no upload).
    pub async fn mount(&self, digest: &str, from_namespace: &str) -> bool {
        let from = OciReference::with_tag(self.host.clone(), from_namespace.to_owned(), "latest".into());
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        self.client
            .mount_blob(&self.blob_reference(), &from, digest)
            .await
            .is_ok()
    }

    pub async fn push_blob(&self, data: Bytes, digest: &str, chunk_size: usize) -> Result<()> {
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        let reference = self.blob_reference();
        let result = if self.chunked {
            let size = data.len() as u64;
            let pieces: Vec<oci_client::errors::Result<Bytes>> = (0..data.len())
                .step_by(chunk_size.max(1))
                .map(|start| Ok(data.slice(start..(start + chunk_size).min(data.len()))))
                .collect();
            self.client
                .push_blob_stream(&reference, futures_util::stream::iter(pieces), digest, Some(size))
                .await
        } else {
            self.client.push_blob(&reference, data, digest).await
        };
        result
            .map(drop)
            .map_err(|e| self.describe(e, &format!("pushing blob {digest}")))
    }

    pub async fn push_manifest(&self, reference: &str, manifest: Bytes) -> Result<()> {
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        self.client
            .push_manifest_raw(
                &self.reference(reference),
                manifest,
                HeaderValue::from_static(media::MANIFEST),
            )
            .await
            .map(drop)
            .map_err(|e| self.describe(e, &format!("pushing manifest for {reference}")))
    }

    fn describe(&self, err: OciDistributionError, doing: &str) -> anyhow::Error {
        let hint = match &err {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::ServerError { code: 401 | 403, .. } => {
                format!(
                    " (check your credentials: `tart login {}`, TART_REGISTRY_USERNAME/TART_REGISTRY_PASSWORD or ~/.docker/config.json)",
                    self.host
                )
            }
            OciDistributionError::RequestError(e) if format!("{e:?}").contains("certificate") => {
                " (to trust a private CA, pass --ca-cert <pem> or set TART_REGISTRY_CA_CERT)".to_owned()
            }
            OciDistributionError::RequestError(e) if e.is_connect() => {
                format!(
                    " (is {} reachable? use --insecure for a registry that speaks plain HTTP)",
                    self.host
                )
            }
            _ => String::new(),
        };
        anyhow!(err).context(format!("{doing} in {}/{}{hint}", self.host, self.namespace))
    }
}

/// Runs `attempt` up to five times, backing off with full jitter (base 1 s, max 20 s) as Tart's
/// swift-retry does, but only while the failure is a transport error.
pub async fn with_retries<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(err) if tries < ATTEMPTS && is_transient(&err) => {
                eprintln!("Error {what}: \"{err:#}\", attempting to re-try...");
                back_off(tries).await;
            }
            other => return other,
        }
    }
}

/// Attempts before a transport error is final.
pub(crate) const ATTEMPTS: u32 = 5;

/// Exponential backoff with full jitter before attempt `tries + 1`.
pub(crate) async fn back_off(tries: u32) {
    let ceiling = Duration::from_secs(1u64 << tries.min(4)).min(Duration::from_secs(20));
    tokio::time::sleep(ceiling.mul_f64(rand::random::<f64>())).await;
}
