use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use super::*;

// Writing an executable while another test thread forks can leave the write descriptor open in
// that child until it execs, and exec of the script then fails with ETXTBSY. Tests that write or
// run helpers therefore take turns.
static HELPERS: Mutex<()> = Mutex::new(());

/// A fake HOME with an empty `bin/` as the whole PATH, and a store under the temp dir.
struct Fixture {
    dir: tempfile::TempDir,
    vars: HashMap<String, String>,
    helper_turn: Option<MutexGuard<'static, ()>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        let vars = HashMap::from([
            ("HOME".to_owned(), dir.path().join("home").display().to_string()),
            ("PATH".to_owned(), dir.path().join("bin").display().to_string()),
        ]);
        Fixture {
            dir,
            vars,
            helper_turn: None,
        }
    }

    fn with_helpers() -> Self {
        Fixture {
            helper_turn: Some(HELPERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
            ..Fixture::new()
        }
    }

    fn set(&mut self, name: &str, value: &str) -> &mut Self {
        self.vars.insert(name.to_owned(), value.to_owned());
        self
    }

    fn docker_config_path(&self) -> PathBuf {
        self.dir.path().join("home/.docker/config.json")
    }

    fn docker_config(&self, json: &str) {
        let path = self.docker_config_path();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, json).unwrap();
    }

    /// `docker-credential-<name>`, a /bin/sh script that may use shell builtins only: its PATH is
    /// just the fixture's `bin/`.
    fn helper(&self, name: &str, body: &str) {
        assert!(self.helper_turn.is_some(), "use Fixture::with_helpers()");
        let path = self.dir.path().join("bin").join(format!("docker-credential-{name}"));
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn store(&self) -> Store {
        Store::new(self.dir.path().join("tart/credentials.json"))
    }

    fn lookup(&self, host: &str) -> Result<Option<(Credentials, Source)>, Error> {
        lookup_with(host, &|name| self.vars.get(name).cloned(), &self.store())
    }

    fn found(&self, host: &str) -> Option<(Credentials, Source)> {
        self.lookup(host).unwrap()
    }
}

fn creds(username: &str, password: &str) -> Credentials {
    Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    }
}

fn basic(username: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

#[test]
fn debug_redacts_the_password() {
    let text = format!("{:?}", creds("alice", "hunter2"));
    assert!(text.contains("alice"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let text = format!("{:?}", Some((creds("alice", "hunter2"), Source::TartStore)));
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn nothing_configured_finds_nothing() {
    assert_eq!(Fixture::new().found("ghcr.io"), None);
}

#[test]
fn environment_needs_both_variables() {
    let mut fixture = Fixture::new();
    fixture.set("TART_REGISTRY_USERNAME", "envuser");
    assert_eq!(fixture.found("ghcr.io"), None);
    fixture.set("TART_REGISTRY_PASSWORD", "envpass");
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("envuser", "envpass"), Source::Environment))
    );
    assert_eq!(
        fixture.found("localhost:5000"),
        Some((creds("envuser", "envpass"), Source::Environment))
    );
}

#[test]
fn environment_hostname_limits_the_variables_to_that_host() {
    let mut fixture = Fixture::new();
    fixture
        .set("TART_REGISTRY_USERNAME", "envuser")
        .set("TART_REGISTRY_PASSWORD", "envpass")
        .set("TART_REGISTRY_HOSTNAME", "localhost:5000");
    assert_eq!(
        fixture.found("localhost:5000"),
        Some((creds("envuser", "envpass"), Source::Environment))
    );
    assert_eq!(fixture.found("localhost"), None);
    assert_eq!(fixture.found("ghcr.io"), None);
}

#[test]
fn docker_auth_field_by_exact_and_normalised_key() {
    let fixture = Fixture::new();
    fixture.docker_config(&format!(
        r#"{{"auths": {{
            "ghcr.io": {{"auth": "{}"}},
            "https://quay.io": {{"auth": "{}"}},
            "http://localhost:5000/v2/": {{"auth": "{}"}},
            "https://index.docker.io/v1/": {{"auth": "{}"}},
            "example.com": {{"auth": "{}"}},
            "https://example.com/v2/": {{"auth": "{}"}}
        }}, "unrelated": [1, 2]}}"#,
        basic("gh", "p:with:colons"),
        basic("quay", "pq"),
        basic("local", "pl"),
        basic("hub", "ph"),
        basic("exact", "pe"),
        basic("normalised", "pn"),
    ));
    let docker = |u, p| Some((creds(u, p), Source::DockerConfig));
    assert_eq!(fixture.found("ghcr.io"), docker("gh", "p:with:colons"));
    assert_eq!(fixture.found("quay.io"), docker("quay", "pq"));
    assert_eq!(fixture.found("localhost:5000"), docker("local", "pl"));
    assert_eq!(fixture.found("docker.io"), docker("hub", "ph"));
    assert_eq!(fixture.found("example.com"), docker("exact", "pe"));
    assert_eq!(fixture.found("localhost"), None);
}

#[test]
fn docker_username_and_password_fields() {
    let fixture = Fixture::new();
    fixture.docker_config(r#"{"auths": {"ghcr.io": {"username": "u", "password": "p"}, "quay.io": {}}}"#);
    assert_eq!(fixture.found("ghcr.io"), Some((creds("u", "p"), Source::DockerConfig)));
    assert_eq!(fixture.found("quay.io"), None);
}

#[test]
fn docker_config_dir_overrides_home() {
    let mut fixture = Fixture::new();
    fixture.docker_config(&format!(
        r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}"#,
        basic("home", "p")
    ));
    let elsewhere = fixture.dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(
        elsewhere.join("config.json"),
        format!(r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}"#, basic("moved", "p")),
    )
    .unwrap();
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("home", "p"), Source::DockerConfig))
    );
    fixture.set("DOCKER_CONFIG", &elsewhere.display().to_string());
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("moved", "p"), Source::DockerConfig))
    );
}

#[test]
fn bad_docker_auth_names_the_entry_but_not_the_value() {
    let fixture = Fixture::new();
    fixture.docker_config(r#"{"auths": {"ghcr.io": {"auth": "bm9jb2xvbmhlcmU="}}}"#);
    let error = fixture.lookup("ghcr.io").unwrap_err();
    assert!(matches!(error, Error::DockerAuthInvalid { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(r#"auths["ghcr.io"]"#), "{message}");
    assert!(message.contains("docker login"), "{message}");
    assert!(
        !message.contains("bm9jb2xvbmhlcmU") && !message.contains("nocolonhere"),
        "{message}"
    );
}

#[test]
fn invalid_docker_config_error_does_not_quote_it() {
    let fixture = Fixture::new();
    fixture.docker_config(r#"{"auths": {"ghcr.io": "c2VjcmV0OnNlY3JldA=="}}"#);
    let error = fixture.lookup("ghcr.io").unwrap_err();
    assert!(matches!(error, Error::DockerConfigInvalid { .. }), "{error:?}");
    let message = error.to_string();
    assert!(!message.contains("c2VjcmV0"), "{message}");
    assert!(
        message.contains(&fixture.docker_config_path().display().to_string()),
        "{message}"
    );
}

#[test]
fn precedence_environment_then_docker_then_store() {
    let mut fixture = Fixture::new();
    fixture.store().set("ghcr.io", &creds("stored", "ps")).unwrap();
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("stored", "ps"), Source::TartStore))
    );

    fixture.docker_config(&format!(
        r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}"#,
        basic("docker", "pd")
    ));
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("docker", "pd"), Source::DockerConfig))
    );

    fixture
        .set("TART_REGISTRY_USERNAME", "env")
        .set("TART_REGISTRY_PASSWORD", "pe");
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("env", "pe"), Source::Environment))
    );
}

#[test]
fn a_failing_source_does_not_hide_later_ones() {
    let fixture = Fixture::new();
    fixture.docker_config("{ not json");
    assert!(matches!(
        fixture.lookup("ghcr.io"),
        Err(Error::DockerConfigInvalid { .. })
    ));
    fixture.store().set("ghcr.io", &creds("stored", "ps")).unwrap();
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("stored", "ps"), Source::TartStore))
    );
}

#[test]
fn store_error_is_reported_when_nothing_is_found() {
    let fixture = Fixture::new();
    let store = fixture.store();
    store.set("ghcr.io", &creds("stored", "ps")).unwrap();
    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        fixture.lookup("ghcr.io"),
        Err(Error::StoreNotPrivate { mode: 0o640, .. })
    ));
}

/// Prints the server address it was asked about as the username, so tests can check stdin.
const ECHO_HELPER: &str = r#"[ "$1" = get ] || exit 3
read -r server
printf '{"ServerURL":"%s","Username":"%s","Secret":"s3cret"}\n' "$server" "$server""#;

#[test]
fn cred_helper_by_exact_key_gets_the_host_on_stdin() {
    let fixture = Fixture::with_helpers();
    fixture.helper("fake", ECHO_HELPER);
    fixture.docker_config(r#"{"credHelpers": {"localhost:5000": "fake"}}"#);
    assert_eq!(
        fixture.found("localhost:5000"),
        Some((
            creds("localhost:5000", "s3cret"),
            Source::DockerHelper("fake".to_owned())
        ))
    );
    assert_eq!(fixture.found("localhost"), None);
}

#[test]
fn cred_helper_keys_are_whole_string_regexes() {
    let fixture = Fixture::with_helpers();
    fixture.helper("ecr", ECHO_HELPER);
    fixture.helper("exact", r#"printf '{"Username":"exact","Secret":"x"}'"#);
    fixture.docker_config(
        r#"{"credHelpers": {
            "(.*).dkr.ecr.(.*).amazonaws.com": "ecr",
            "*.invalid[regex": "exact",
            "123.dkr.ecr.eu-west-1.amazonaws.com": "exact"
        }}"#,
    );
    let host = "456.dkr.ecr.us-east-1.amazonaws.com";
    assert_eq!(
        fixture.found(host),
        Some((creds(host, "s3cret"), Source::DockerHelper("ecr".to_owned())))
    );
    // The exact key wins over a matching pattern.
    assert_eq!(
        fixture.found("123.dkr.ecr.eu-west-1.amazonaws.com"),
        Some((creds("exact", "x"), Source::DockerHelper("exact".to_owned())))
    );
    // Whole-string: a pattern that matches only part of the host does not count.
    assert_eq!(fixture.found("456.dkr.ecr.us-east-1.amazonaws.com.evil.example"), None);
}

#[test]
fn auths_come_before_cred_helpers() {
    let fixture = Fixture::with_helpers();
    fixture.helper("fake", ECHO_HELPER);
    fixture.docker_config(&format!(
        r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}, "credHelpers": {{"ghcr.io": "fake"}}}}"#,
        basic("docker", "pd")
    ));
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("docker", "pd"), Source::DockerConfig))
    );
}

#[test]
fn creds_store_is_asked_with_the_address_docker_stored() {
    let fixture = Fixture::with_helpers();
    fixture.helper("desktop", ECHO_HELPER);
    fixture.docker_config(r#"{"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "desktop"}"#);
    let helper = Source::DockerHelper("desktop".to_owned());
    assert_eq!(
        fixture.found("docker.io"),
        Some((creds("https://index.docker.io/v1/", "s3cret"), helper.clone()))
    );
    assert_eq!(fixture.found("quay.io"), Some((creds("quay.io", "s3cret"), helper)));
}

#[test]
fn cred_helper_is_authoritative_over_creds_store() {
    let fixture = Fixture::with_helpers();
    fixture.helper("empty", "echo 'credentials not found in native keychain'; exit 1");
    fixture.helper("desktop", ECHO_HELPER);
    fixture.docker_config(r#"{"credHelpers": {"ghcr.io": "empty"}, "credsStore": "desktop"}"#);
    fixture.store().set("ghcr.io", &creds("stored", "ps")).unwrap();
    assert_eq!(
        fixture.found("ghcr.io"),
        Some((creds("stored", "ps"), Source::TartStore))
    );
    assert_eq!(
        fixture.found("quay.io"),
        Some((creds("quay.io", "s3cret"), Source::DockerHelper("desktop".to_owned())))
    );
}

#[test]
fn helper_without_credentials_means_none() {
    let fixture = Fixture::with_helpers();
    fixture.helper("fake", "echo 'credentials not found in native keychain' >&2; exit 1");
    fixture.docker_config(r#"{"credHelpers": {"ghcr.io": "fake"}}"#);
    assert_eq!(fixture.found("ghcr.io"), None);
}

#[test]
fn missing_helper_says_which_helper_and_which_entry() {
    let fixture = Fixture::with_helpers();
    fixture.docker_config(r#"{"credHelpers": {"(.*)\\.example\\.com": "nosuch"}}"#);
    let error = fixture.lookup("registry.example.com").unwrap_err();
    assert!(matches!(error, Error::HelperNotFound { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("docker-credential-nosuch"), "{message}");
    assert!(message.contains(r#"credHelpers["(.*)\.example\.com"]"#), "{message}");
    assert!(message.contains("PATH"), "{message}");

    fixture.docker_config(r#"{"credsStore": "nosuch"}"#);
    let message = fixture.lookup("ghcr.io").unwrap_err().to_string();
    assert!(
        message.contains("docker-credential-nosuch") && message.contains("credsStore"),
        "{message}"
    );
}

#[test]
fn helper_is_found_only_through_the_path_passed_in() {
    let mut fixture = Fixture::with_helpers();
    fixture.helper("fake", ECHO_HELPER);
    fixture.docker_config(r#"{"credHelpers": {"ghcr.io": "fake"}}"#);
    fixture.set("PATH", "/nonexistent:");
    assert!(matches!(fixture.lookup("ghcr.io"), Err(Error::HelperNotFound { .. })));
}

#[test]
fn failing_helper_reports_its_output() {
    let fixture = Fixture::with_helpers();
    fixture.helper("fake", "echo 'token expired, run: fake-login' >&2; exit 2");
    fixture.docker_config(r#"{"credHelpers": {"ghcr.io": "fake"}}"#);
    let error = fixture.lookup("ghcr.io").unwrap_err();
    assert!(matches!(error, Error::HelperFailed { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("docker-credential-fake get"), "{message}");
    assert!(message.contains("token expired, run: fake-login"), "{message}");
}

#[test]
fn malformed_helper_response_does_not_leak_the_secret() {
    let fixture = Fixture::with_helpers();
    fixture.helper("fake", r#"printf '{"Username":"u","Secret":987654321}'"#);
    fixture.docker_config(r#"{"credHelpers": {"ghcr.io": "fake"}}"#);
    let error = fixture.lookup("ghcr.io").unwrap_err();
    assert!(matches!(error, Error::HelperResponseInvalid { .. }), "{error:?}");
    let message = error.to_string();
    assert!(!message.contains("987654321"), "{message}");
    assert!(message.contains("docker-credential-fake"), "{message}");
}
