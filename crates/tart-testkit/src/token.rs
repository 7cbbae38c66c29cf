//! An in-process Docker token server (the `realm` of `auth.token`) for distribution 2.8.

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use data_encoding::{BASE32, BASE64, BASE64URL_NOPAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

use crate::http::{self, Response};

pub(crate) const SERVICE: &str = "tart-testkit-registry";
pub(crate) const ISSUER: &str = "tart-testkit-token-server";

/// distribution 2.8 accepts a token until 60 s past its `exp` (`token.Leeway`); tokens are backdated by
/// this much so that the registry itself starts rejecting them once `TokenOptions::lifetime` is over.
const REGISTRY_LEEWAY_SECS: i64 = 60;

/// How the token server of [`crate::Registry::token_with`] behaves.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    /// How long a token is accepted by the registry, rounded down to whole seconds (at least 1 s). Also
    /// sent as `expires_in`. Note that Docker's own client treats anything under 60 s as 60 s.
    pub lifetime: Duration,
    /// Hand out pull-only tokens to requests without credentials, like Docker Hub does for public images.
    pub anonymous_pull: bool,
}

impl Default for TokenOptions {
    fn default() -> TokenOptions {
        TokenOptions {
            lifetime: Duration::from_secs(300),
            anonymous_pull: false,
        }
    }
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The user of the request's Basic credentials, `None` for an anonymous request.
    pub user: Option<String>,
    pub service: Option<String>,
    /// The `scope` parameters as sent, e.g. `repository:vm/ubuntu:pull,push`.
    pub scopes: Vec<String>,
    /// Whether a token was issued (a wrong password or a refused anonymous request gets 401).
    pub granted: bool,
}

/// The token signing key. distribution 2.8 finds the key of a token either from an `x5c` certificate
/// chain in the JWT header that verifies against `rootcertbundle`, or from a `kid` that equals the
/// libtrust key ID of a certificate's public key in `rootcertbundle`; the testkit uses `kid`.
struct SigningKey {
    pair: EcdsaKeyPair,
    kid: String,
    cert_pem: String,
    rng: SystemRandom,
}

impl SigningKey {
    fn generate() -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate P-256 key");
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("load P-256 key");
        let cert_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("load P-256 key into rcgen");
        debug_assert!(cert_key.public_key_raw() == pair.public_key().as_ref());
        let cert = rcgen::CertificateParams::new(vec!["tart-testkit-token".to_owned()])
            .and_then(|params| params.self_signed(&cert_key))
            .expect("self-sign token certificate");
        SigningKey {
            kid: libtrust_key_id(&cert_key.public_key_der()),
            cert_pem: cert.pem(),
            pair,
            rng,
        }
    }

    /// A compact JWS (ES256: P-256 with the fixed-width r||s signature that JOSE and libtrust expect).
    fn sign(&self, claims: &serde_json::Value) -> String {
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let signature = self.pair.sign(&self.rng, input.as_bytes()).expect("sign token");
        format!("{input}.{}", BASE64URL_NOPAD.encode(signature.as_ref()))
    }
}

/// libtrust's key ID: the SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 in groups of
/// four characters joined by colons.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let encoded = BASE32.encode(&hash.as_ref()[..30]);
    let groups: Vec<&str> = encoded
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    groups.join(":")
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0; bytes];
    SystemRandom::new().fill(&mut buf).expect("system randomness");
    data_encoding::HEXLOWER.encode(&buf)
}

struct Shared {
    user: String,
    password: String,
    options: TokenOptions,
    key: SigningKey,
    requests: Mutex<Vec<TokenRequest>>,
}

pub(crate) struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TokenServer {
    pub(crate) fn start(user: &str, password: &str, options: TokenOptions) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server on 127.0.0.1");
        let addr = listener.local_addr().expect("token server address");
        let shared = Arc::new(Shared {
            user: user.to_owned(),
            password: password.to_owned(),
            options,
            key: SigningKey::generate(),
            requests: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            thread::Builder::new()
                .name("testkit-token".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let shared = Arc::clone(&shared);
                        let _ = thread::Builder::new()
                            .name("testkit-token-conn".into())
                            .spawn(move || serve(stream, &shared));
                    }
                })
                .expect("spawn token server thread")
        };
        TokenServer {
            addr,
            shared,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub(crate) fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub(crate) fn cert_pem(&self) -> &str {
        &self.shared.key.cert_pem
    }

    pub(crate) fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// One request per connection (`Connection: close`): token requests carry no body, and clients cope.
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(read_half) = stream.try_clone() else { return };
    let Ok(Some(request)) = http::read_request(&mut BufReader::new(read_half)) else {
        return;
    };
    let reply = answer(&request, shared);
    let mut stream = stream;
    let _ = stream.write_all(&reply);
    let _ = stream.shutdown(Shutdown::Both);
}

fn answer(request: &http::Request, shared: &Shared) -> Vec<u8> {
    if request.method != "GET" || request.path() != "/token" {
        return Response::new(404, "Not Found").with_body("text/plain", b"not found\n");
    }
    let mut record = TokenRequest {
        user: None,
        service: None,
        scopes: Vec::new(),
        granted: false,
    };
    for (name, value) in request.query_pairs() {
        match name.as_str() {
            "service" => record.service = Some(value),
            "scope" => record
                .scopes
                .extend(value.split(' ').filter(|s| !s.is_empty()).map(str::to_owned)),
            _ => {}
        }
    }
    let credentials = request.headers.get("authorization").and_then(basic_credentials);
    record.user = credentials.as_ref().map(|(user, _)| user.clone());
    let pull_only = match &credentials {
        Some((user, password)) => {
            if *user != shared.user || *password != shared.password {
                return unauthorized(shared, record);
            }
            false
        }
        None if shared.options.anonymous_pull => true,
        None => return unauthorized(shared, record),
    };

    let access: Vec<serde_json::Value> = record
        .scopes
        .iter()
        .filter_map(|scope| granted_access(scope, pull_only))
        .collect();
    let lifetime = shared.options.lifetime.as_secs().max(1) as i64;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    let issued = now.as_secs() as i64;
    let claims = json!({
        "iss": ISSUER,
        "sub": record.user.clone().unwrap_or_default(),
        "aud": SERVICE,
        "exp": issued + lifetime - REGISTRY_LEEWAY_SECS,
        "nbf": issued,
        "iat": issued,
        "jti": random_hex(16),
        "access": access,
    });
    let token = shared.key.sign(&claims);
    let issued_at = time::OffsetDateTime::from_unix_timestamp(issued)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let body = json!({"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued_at});
    record.granted = true;
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(record);
    Response::new(200, "OK").with_body("application/json", body.to_string().as_bytes())
}

fn unauthorized(shared: &Shared, record: TokenRequest) -> Vec<u8> {
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(record);
    let mut response = Response::new(401, "Unauthorized");
    response
        .headers
        .set("WWW-Authenticate", "Basic realm=\"tart-testkit token server\"");
    let body = json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]});
    response.with_body("application/json", body.to_string().as_bytes())
}

/// `type:name:actions`, where the name may itself contain colons (a registry host with a port).
fn granted_access(scope: &str, pull_only: bool) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions.split(',').filter(|a| !pull_only || *a == "pull").collect();
    Some(json!({"type": kind, "name": name, "actions": actions}))
}

fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim().as_bytes()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_has_libtrust_shape() {
        let id = libtrust_key_id(b"any bytes");
        assert_eq!(id.len(), 12 * 4 + 11);
        assert!(id
            .split(':')
            .all(|group| group.len() == 4 && group.bytes().all(|b| b.is_ascii_alphanumeric())));
    }

    #[test]
    fn scopes_with_colons_in_the_name_are_split_at_the_ends() {
        assert_eq!(
            granted_access("repository:localhost:5000/vm:pull,push", true),
            Some(json!({"type": "repository", "name": "localhost:5000/vm", "actions": ["pull"]}))
        );
    }
}
