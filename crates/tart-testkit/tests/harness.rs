//! Proves the testkit against the real `docker-registry`: every auth mode stores and serves an image
//! pushed over the plain distribution API, and every proxy fault is observable by a client.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use data_encoding::BASE64;
use tart_testkit::{sha256_digest, FaultProxy, Registry, TokenOptions};
use ureq::http::Response;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// No redirects and no status-as-error, so tests see exactly what the server sent.
fn raw_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", BASE64.encode(format!("{user}:{password}").as_bytes()))
}

/// Bytes that differ at every offset a fault might touch, and are not all equal.
fn sample_blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn manifest_for(config: &[u8], layer: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config), "size": config.len()},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256_digest(layer), "size": layer.len()}],
    })
    .to_string()
    .into_bytes()
}

/// Pushes a one-layer image through the registry's helpers and returns (layer, layer digest).
fn push_image(registry: &Registry, repo: &str, tag: &str, layer_len: usize) -> (Vec<u8>, String) {
    let config = br#"{"architecture":"arm64","os":"linux"}"#;
    let layer = sample_blob(layer_len);
    registry.push_blob(repo, config);
    let digest = registry.push_blob(repo, &layer);
    registry.push_manifest(repo, tag, OCI_MANIFEST, &manifest_for(config, &layer));
    (layer, digest)
}

fn assert_image_readable(registry: &Registry, repo: &str, tag: &str, layer: &[u8], digest: &str) {
    let (manifest, content_type) = registry.manifest(repo, tag);
    assert_eq!(content_type, OCI_MANIFEST);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["layers"][0]["digest"], digest);
    assert_eq!(registry.blob(repo, digest), layer);
    assert_eq!(registry.tags(repo), [tag]);
}

fn body(response: &mut Response<ureq::Body>) -> Vec<u8> {
    response.body_mut().with_config().limit(u64::MAX).read_to_vec().unwrap()
}

/// Reads a body until it ends or fails; returns what arrived and whether it failed.
fn read_until_error(response: Response<ureq::Body>) -> (Vec<u8>, bool) {
    let mut reader = response.into_body().into_reader();
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (received, false),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(_) => return (received, true),
        }
    }
}

fn content_length(response: &Response<ureq::Body>) -> u64 {
    response.headers()["content-length"].to_str().unwrap().parse().unwrap()
}

#[test]
fn anonymous_registry_stores_and_serves_an_image() {
    let registry = Registry::anonymous();
    assert!(registry.url().starts_with("http://127.0.0.1:"));
    assert_eq!(registry.credentials(), None);
    assert_eq!(
        raw_agent()
            .get(format!("{}/v2/", registry.url()))
            .call()
            .unwrap()
            .status(),
        200
    );

    let (layer, digest) = push_image(&registry, "org/vm", "v1", 10_000);
    assert_image_readable(&registry, "org/vm", "v1", &layer, &digest);
    assert!(registry.tags("org/other").is_empty());
}

#[test]
fn basic_registry_accepts_only_the_right_password() {
    let registry = Registry::basic("alice", "s3cret");
    let agent = raw_agent();
    let v2 = format!("{}/v2/", registry.url());
    let anonymous = agent.get(&v2).call().unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
    let wrong = agent
        .get(&v2)
        .header("Authorization", basic("alice", "wrong"))
        .call()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = agent
        .get(&v2)
        .header("Authorization", basic("alice", "s3cret"))
        .call()
        .unwrap();
    assert_eq!(right.status(), 200);

    let (layer, digest) = push_image(&registry, "vm", "latest", 5_000);
    assert_image_readable(&registry, "vm", "latest", &layer, &digest);
}

#[test]
fn token_registry_serves_a_client_that_follows_the_challenge() {
    let registry = Registry::token("bob", "hunter2");
    let agent = raw_agent();

    // Like a real client: learn the realm from the 401, ask it for a token for this repository.
    let start = agent
        .post(format!("{}/v2/vm/blobs/uploads/", registry.url()))
        .send_empty()
        .unwrap();
    assert_eq!(start.status(), 401);
    let challenge = start.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let realm = registry.token_realm().unwrap();
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"{realm}\",service=\"")),
        "{challenge}"
    );
    // distribution lists the actions in Go map order, which varies.
    let scope = challenge.split("scope=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(
        ["repository:vm:pull,push", "repository:vm:push,pull"].contains(&scope),
        "{challenge}"
    );
    let service = challenge.split("service=\"").nth(1).unwrap().split('"').next().unwrap();

    let token_url = format!("{realm}?service={service}&scope=repository%3Avm%3Apull%2Cpush");
    let refused = agent
        .get(&token_url)
        .header("Authorization", basic("bob", "nope"))
        .call()
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        agent.get(&token_url).call().unwrap().status(),
        401,
        "no anonymous tokens unless enabled"
    );
    let mut granted = agent
        .get(&token_url)
        .header("Authorization", basic("bob", "hunter2"))
        .call()
        .unwrap();
    assert_eq!(granted.status(), 200);
    let reply: serde_json::Value = serde_json::from_slice(&body(&mut granted)).unwrap();
    assert_eq!(reply["token"], reply["access_token"]);
    assert_eq!(reply["expires_in"], 300);
    assert!(reply["issued_at"].as_str().unwrap().ends_with('Z'));
    let bearer = format!("Bearer {}", reply["token"].as_str().unwrap());

    let upload = |blob: &[u8]| {
        let start = agent
            .post(format!("{}/v2/vm/blobs/uploads/", registry.url()))
            .header("Authorization", &bearer)
            .send_empty()
            .unwrap();
        assert_eq!(start.status(), 202);
        let location = start.headers()["location"].to_str().unwrap();
        let digest = sha256_digest(blob);
        let put = agent
            .put(format!("{location}&digest={digest}"))
            .header("Authorization", &bearer)
            .header("Content-Type", "application/octet-stream")
            .send(blob)
            .unwrap();
        assert_eq!(put.status(), 201);
        digest
    };
    let (config, layer) = (b"{}", sample_blob(20_000));
    upload(config);
    let digest = upload(&layer);
    let manifest = manifest_for(config, &layer);
    let put = agent
        .put(format!("{}/v2/vm/manifests/v1", registry.url()))
        .header("Authorization", &bearer)
        .header("Content-Type", OCI_MANIFEST)
        .send(&manifest[..])
        .unwrap();
    assert_eq!(put.status(), 201);

    assert_image_readable(&registry, "vm", "v1", &layer, &digest);
    let requests = registry.token_requests();
    assert_eq!(requests.iter().filter(|r| !r.granted).count(), 2);
    assert!(requests
        .iter()
        .any(|r| r.granted && r.user.as_deref() == Some("bob") && r.scopes == ["repository:vm:pull"]));
}

#[test]
fn token_lifetime_is_enforced_by_the_registry() {
    let lifetime = Duration::from_secs(3);
    let registry = Registry::token_with(
        "bob",
        "hunter2",
        TokenOptions {
            lifetime,
            anonymous_pull: false,
        },
    );
    let (layer, digest) = push_image(&registry, "vm", "v1", 1_000);
    let agent = raw_agent();

    let realm = registry.token_realm().unwrap();
    let issued = Instant::now();
    let mut reply = agent
        .get(format!(
            "{realm}?service=tart-testkit-registry&scope=repository:vm:pull"
        ))
        .header("Authorization", basic("bob", "hunter2"))
        .call()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&body(&mut reply)).unwrap();
    assert_eq!(reply["expires_in"], 3);
    let bearer = format!("Bearer {}", reply["token"].as_str().unwrap());
    let manifest_url = format!("{}/v2/vm/manifests/v1", registry.url());
    let get = || {
        agent
            .get(&manifest_url)
            .header("Accept", OCI_MANIFEST)
            .header("Authorization", &bearer)
            .call()
    };
    assert_eq!(get().unwrap().status(), 200);
    // Same header and claims, a well-formed but wrong ES256 signature (64 zero bytes).
    let forged = format!("{}{}", bearer.trim_end_matches(|c: char| c != '.'), "A".repeat(86));
    let forged = agent
        .get(&manifest_url)
        .header("Accept", OCI_MANIFEST)
        .header("Authorization", forged)
        .call();
    assert_eq!(forged.unwrap().status(), 401, "the registry checks signatures");

    // Whole seconds on both sides: the token may die up to a second early, never late.
    std::thread::sleep((lifetime + Duration::from_millis(1100)).saturating_sub(issued.elapsed()));
    assert_eq!(get().unwrap().status(), 401, "expired token still accepted");

    let before = registry.token_requests().len();
    assert_image_readable(&registry, "vm", "v1", &layer, &digest);
    assert!(registry.token_requests().len() > before, "helpers fetch a fresh token");
}

#[test]
fn anonymous_pull_tokens_grant_pull_only() {
    let options = TokenOptions {
        anonymous_pull: true,
        ..TokenOptions::default()
    };
    let registry = Registry::token_with("bob", "hunter2", options);
    push_image(&registry, "vm", "v1", 100);
    let agent = raw_agent();

    let mut reply = agent
        .get(format!(
            "{}?service=tart-testkit-registry&scope=repository:vm:pull,push",
            registry.token_realm().unwrap()
        ))
        .call()
        .unwrap();
    assert_eq!(reply.status(), 200);
    let reply: serde_json::Value = serde_json::from_slice(&body(&mut reply)).unwrap();
    let bearer = format!("Bearer {}", reply["token"].as_str().unwrap());
    let pull = agent
        .get(format!("{}/v2/vm/manifests/v1", registry.url()))
        .header("Accept", OCI_MANIFEST)
        .header("Authorization", &bearer)
        .call()
        .unwrap();
    assert_eq!(pull.status(), 200);
    let push = agent
        .post(format!("{}/v2/vm/blobs/uploads/", registry.url()))
        .header("Authorization", &bearer)
        .send_empty()
        .unwrap();
    assert_eq!(push.status(), 401);
    assert_eq!(registry.token_requests().last().unwrap().user, None);
}

#[test]
fn proxy_forwards_chunked_uploads_and_ranged_downloads_and_logs_them() {
    let registry = Registry::basic("alice", "s3cret");
    let proxy = FaultProxy::start(registry.host());
    let agent = raw_agent();
    let auth = basic("alice", "s3cret");
    let layer = sample_blob(50_000);
    let digest = sha256_digest(&layer);

    let start = agent
        .post(format!("{}/v2/vm/blobs/uploads/", proxy.url()))
        .header("Authorization", &auth)
        .send_empty()
        .unwrap();
    assert_eq!(start.status(), 202);
    let location = start.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&proxy.url()),
        "the registry builds Location from the forwarded Host: {location}"
    );
    // A reader of unknown length goes out with Transfer-Encoding: chunked.
    let put = agent
        .put(format!("{location}&digest={digest}"))
        .header("Authorization", &auth)
        .send(ureq::SendBody::from_reader(&mut &layer[..]))
        .unwrap();
    assert_eq!(put.status(), 201);
    assert_eq!(registry.blob("vm", &digest), layer);

    let blob_url = format!("{}/v2/vm/blobs/{digest}", proxy.url());
    let mut ranged = agent
        .get(&blob_url)
        .header("Authorization", &auth)
        .header("Range", "bytes=1000-")
        .call()
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(body(&mut ranged), &layer[1000..]);
    let mut head = agent.head(&blob_url).header("Authorization", &auth).call().unwrap();
    assert_eq!(content_length(&head), layer.len() as u64);
    assert!(body(&mut head).is_empty());

    let log = proxy.requests();
    let methods: Vec<(&str, u16)> = log.iter().map(|r| (r.method.as_str(), r.status)).collect();
    assert_eq!(methods, [("POST", 202), ("PUT", 201), ("GET", 206), ("HEAD", 200)]);
    assert!(log[1].query.as_deref().unwrap().contains("digest=sha256:"));
    assert!(log.iter().all(|r| r.authorization.as_deref() == Some(auth.as_str())));
    let gets = proxy.blob_gets(&digest);
    assert_eq!(gets.len(), 1);
    assert!(gets[0].has_range() && gets[0].has_authorization());
    assert_eq!(gets[0].range.as_deref(), Some("bytes=1000-"));
    proxy.clear_requests();
    assert!(proxy.requests().is_empty());
}

#[test]
fn proxy_corrupts_one_byte_until_cleared() {
    let registry = Registry::anonymous();
    let (layer, digest) = push_image(&registry, "vm", "v1", 30_000);
    let proxy = FaultProxy::start(registry.host());
    let agent = raw_agent();
    let url = format!("{}/v2/vm/blobs/{digest}", proxy.url());

    proxy.corrupt_blob(&digest);
    let corrupted = body(&mut agent.get(&url).call().unwrap());
    assert_eq!(corrupted.len(), layer.len());
    assert_eq!(corrupted.iter().zip(&layer).filter(|(a, b)| a != b).count(), 1);
    assert_ne!(sha256_digest(&corrupted), digest);
    // Other blobs and the manifest are untouched.
    let manifest = body(
        &mut agent
            .get(format!("{}/v2/vm/manifests/v1", proxy.url()))
            .header("Accept", OCI_MANIFEST)
            .call()
            .unwrap(),
    );
    assert_eq!(manifest, registry.manifest("vm", "v1").0);

    proxy.clear_faults();
    assert_eq!(body(&mut agent.get(&url).call().unwrap()), layer);
}

#[test]
fn proxy_truncates_a_set_number_of_times_and_range_resumes() {
    let registry = Registry::anonymous();
    let (layer, digest) = push_image(&registry, "vm", "v1", 40_000);
    let proxy = FaultProxy::start(registry.host());
    let agent = raw_agent();
    let url = format!("{}/v2/vm/blobs/{digest}", proxy.url());
    proxy.truncate_blob_after(&digest, 10_000, 2);

    let first = agent.get(&url).call().unwrap();
    assert_eq!(
        content_length(&first),
        layer.len() as u64,
        "the full length is announced"
    );
    let (mut received, failed) = read_until_error(first);
    assert!(failed);
    assert_eq!(received, &layer[..10_000]);

    let second = agent
        .get(&url)
        .header("Range", format!("bytes={}-", received.len()))
        .call()
        .unwrap();
    assert_eq!(second.status(), 206);
    let (part, failed) = read_until_error(second);
    assert!(failed);
    assert_eq!(part.len(), 10_000);
    received.extend_from_slice(&part);

    let mut third = agent
        .get(&url)
        .header("Range", format!("bytes={}-", received.len()))
        .call()
        .unwrap();
    assert_eq!(third.status(), 206);
    received.extend_from_slice(&body(&mut third));
    assert_eq!(received, layer);

    let ranges: Vec<Option<String>> = proxy.blob_gets(&digest).into_iter().map(|r| r.range).collect();
    assert_eq!(ranges, [None, Some("bytes=10000-".into()), Some("bytes=20000-".into())]);
}

#[test]
fn proxy_lies_about_content_length_both_ways() {
    let registry = Registry::anonymous();
    let (layer, digest) = push_image(&registry, "vm", "v1", 8_000);
    let proxy = FaultProxy::start(registry.host());
    let agent = raw_agent();
    let url = format!("{}/v2/vm/blobs/{digest}", proxy.url());

    proxy.lie_content_length(&digest, 7);
    let longer = agent.get(&url).call().unwrap();
    assert_eq!(content_length(&longer), layer.len() as u64 + 7);
    let (received, failed) = read_until_error(longer);
    assert!(failed, "the connection closes before the announced length");
    assert_eq!(received, layer);

    proxy.lie_content_length(&digest, -7);
    let mut shorter = agent.get(&url).call().unwrap();
    assert_eq!(content_length(&shorter), layer.len() as u64 - 7);
    assert_eq!(body(&mut shorter), &layer[..layer.len() - 7]);
}

#[test]
fn proxy_stalls_a_download_half_way() {
    let registry = Registry::anonymous();
    let (layer, digest) = push_image(&registry, "vm", "v1", 64_000);
    let proxy = FaultProxy::start(registry.host());
    let delay = Duration::from_secs(2);
    proxy.delay_blob(&digest, delay);

    let started = Instant::now();
    let response = raw_agent()
        .get(format!("{}/v2/vm/blobs/{digest}", proxy.url()))
        .call()
        .unwrap();
    let mut reader = response.into_body().into_reader();
    let mut first_half = vec![0; layer.len() / 2];
    reader.read_exact(&mut first_half).unwrap();
    assert!(started.elapsed() < delay, "the first half arrives before the stall");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(started.elapsed() >= delay);
    first_half.extend_from_slice(&rest);
    assert_eq!(first_half, layer);
}

#[test]
fn proxy_redirects_blob_downloads_to_another_host() {
    let registry = Registry::anonymous();
    let (layer, digest) = push_image(&registry, "vm", "v1", 3_000);
    let front = FaultProxy::start(registry.host());
    let cdn = FaultProxy::start(registry.host());
    front.redirect_blobs_to(cdn.host());
    let url = format!("{}/v2/vm/blobs/{digest}", front.url());

    let redirect = raw_agent()
        .get(&url)
        .header("Authorization", "Bearer secret")
        .call()
        .unwrap();
    assert_eq!(redirect.status(), 307);
    assert_eq!(
        redirect.headers()["location"],
        format!("{}/v2/vm/blobs/{digest}", cdn.url())
    );

    // ureq's default, like any careful client: credentials are not carried to another host.
    let following: ureq::Agent = ureq::Agent::config_builder().build().into();
    let mut response = following
        .get(&url)
        .header("Authorization", "Bearer secret")
        .call()
        .unwrap();
    assert_eq!(body(&mut response), layer);
    let front_log = front.blob_gets(&digest);
    assert!(front_log.iter().all(|r| r.status == 307 && r.has_authorization()));
    assert_eq!(cdn.blob_gets(&digest).len(), 1);
    assert!(!cdn.blob_gets(&digest)[0].has_authorization());
    assert_eq!(cdn.blob_gets(&digest)[0].status, 200);

    front.clear_faults();
    let mut direct = raw_agent().get(&url).call().unwrap();
    assert_eq!(direct.status(), 200);
    assert_eq!(body(&mut direct), layer);
}

#[test]
fn handles_can_be_shared_between_tests() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Registry>();
    shareable::<FaultProxy>();
}

#[test]
fn dropping_stops_registry_and_proxy() {
    let registry = Registry::token("bob", "hunter2");
    let proxy = FaultProxy::start(registry.host());
    let (registry_host, proxy_host) = (registry.host().to_owned(), proxy.host().to_owned());
    let realm = registry.token_realm().unwrap();
    let token_host = realm
        .trim_start_matches("http://")
        .trim_end_matches("/token")
        .to_owned();
    assert!(TcpStream::connect(&registry_host).is_ok());
    drop(proxy);
    drop(registry);
    for host in [registry_host, proxy_host, token_host] {
        assert!(TcpStream::connect(&host).is_err(), "{host} still accepts connections");
    }
}
