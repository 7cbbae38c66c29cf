//! The registry client: `oci-client` does the distribution protocol and the token dance; this
//! wrapper adds what Tart needs on top (resumable blob streams, HEAD before upload, mounts,
//! PATCH chunk sizes, retries) and turns its errors into messages a user can act on.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference as OciReference, RegistryOperation};
use reqwest::header::HeaderValue;

use crate::manifest::sha256_digest;
use crate::media;
use crate::retry::RetryPolicy;

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
    retry: RetryPolicy,
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
            retry: RetryPolicy::from_env()?,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// When failed requests to this registry are tried again.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Runs a request until it succeeds, fails for good, or the retry policy gives up.
    pub(crate) async fn with_retries<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        crate::retry::with_retries(self.retry, what, attempt).await
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

    /// The manifest (or index) bytes as sent and their digest, computed by us. A manifest fetched by digest
    /// must hash to that digest, or the registry is lying.
    pub async fn manifest(&self, reference: &str) -> Result<(Bytes, String)> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&self.reference(reference), &self.auth, &media::ACCEPTED_MANIFESTS)
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

    /// Uploads the first `size` bytes of `file`, read a piece at a time (a PATCH each when
    /// chunked), so a blob never needs to fit in memory.
    pub async fn push_blob_file(&self, file: Arc<File>, size: u64, digest: &str, chunk_size: usize) -> Result<()> {
        let piece = if self.chunked {
            chunk_size.max(1) as u64
        } else {
            1 << 20
        };
        let pieces = futures_util::stream::try_unfold(0u64, move |offset| {
            let file = file.clone();
            async move {
                if offset >= size {
                    return Ok(None);
                }
                let n = piece.min(size - offset) as usize;
                let data = tokio::task::spawn_blocking(move || {
                    let mut data = vec![0u8; n];
                    file.read_exact_at(&mut data, offset).map(|()| data)
                })
                .await
                .map_err(std::io::Error::other)??;
                Ok::<_, OciDistributionError>(Some((Bytes::from(data), offset + n as u64)))
            }
        });
        self.client.store_auth_if_needed(&self.host, &self.auth).await;
        self.client
            .push_blob_stream(&self.blob_reference(), pieces, digest, Some(size))
            .await
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
