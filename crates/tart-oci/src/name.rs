use std::fmt;
use std::str::FromStr;

/// A registry image name as Tart's grammar defines it: `host[:port]/namespace[:tag|@sha256:hex]`.
/// The host is mandatory (there is no Docker Hub default), so `debian:latest` is a local name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteName {
    /// Host with its port, if any: `localhost:5000`.
    pub host: String,
    /// Repository path inside the registry: `cirruslabs/ubuntu`.
    pub namespace: String,
    pub reference: Reference,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    /// `sha256:<64 lowercase hex>`.
    Digest(String),
}

#[derive(Debug, thiserror::Error)]
#[error("failed to parse remote name: {0}")]
pub struct NameError(String);

impl RemoteName {
    /// The same image addressed by digest.
    pub fn with_digest(&self, digest: &str) -> RemoteName {
        RemoteName {
            reference: Reference::Digest(digest.to_owned()),
            ..self.clone()
        }
    }
}

impl Reference {
    /// The string that names this reference in URLs and in the cache tree (`latest`, `sha256:…`).
    pub fn value(&self) -> &str {
        match self {
            Reference::Tag(tag) | Reference::Digest(tag) => tag,
        }
    }
}

impl fmt::Display for RemoteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(tag) => write!(f, "{}/{}:{tag}", self.host, self.namespace),
            Reference::Digest(digest) => write!(f, "{}/{}@{digest}", self.host, self.namespace),
        }
    }
}

impl FromStr for RemoteName {
    type Err = NameError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| NameError(format!("{input:?}: {why}"));
        if !input.is_ascii() {
            return Err(fail("only ASCII characters are allowed".into()));
        }
        let (host_port, rest) = input
            .split_once('/')
            .ok_or_else(|| fail("expected <host>/<namespace>".into()))?;
        let (host, port) = match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        if host.is_empty() || !host.split('.').all(is_host_component) {
            return Err(fail(format!("invalid host {host:?}")));
        }
        if let Some(port) = port {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(format!("invalid port {port:?}")));
            }
        }

        let (namespace, reference) = if let Some((namespace, digest)) = rest.split_once('@') {
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or_else(|| fail("a digest reference must start with @sha256:".into()))?;
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(fail("a sha256 digest is 64 lowercase hexadecimal digits".into()));
            }
            (namespace, Reference::Digest(digest.to_owned()))
        } else {
            let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
            match rest[last_slash..].rfind(':') {
                Some(colon) => {
                    let tag = &rest[last_slash + colon + 1..];
                    if !is_tag(tag) {
                        return Err(fail(format!("invalid tag {tag:?}")));
                    }
                    (&rest[..last_slash + colon], Reference::Tag(tag.to_owned()))
                }
                None => (rest, Reference::Tag("latest".to_owned())),
            }
        };
        if namespace.is_empty() {
            return Err(fail("the namespace is empty".into()));
        }
        if let Some(bad) = namespace.split('/').find(|c| !is_namespace_component(c)) {
            return Err(fail(format!("invalid namespace component {bad:?}")));
        }
        Ok(RemoteName {
            host: host_port.to_owned(),
            namespace: namespace.to_owned(),
            reference,
        })
    }
}

fn is_separator(b: u8) -> bool {
    matches!(b, b'.' | b'-' | b'_')
}

/// `name ('-' name)*`
fn is_host_component(s: &str) -> bool {
    !s.is_empty()
        && s.split('-')
            .all(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// `(name separator?)+`: starts with an alphanumeric, no two separators in a row. This also
/// rules out `.` and `..`, which would escape the cache directory.
fn is_namespace_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || is_separator(b))
        && !bytes.windows(2).any(|w| is_separator(w[0]) && is_separator(w[1]))
}

/// `name (separator name)*`
fn is_tag(s: &str) -> bool {
    is_namespace_component(s) && !s.bytes().last().is_some_and(is_separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RemoteName {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_the_grammar() {
        let name = parse("ghcr.io/cirruslabs/macos-tahoe-base:latest");
        assert_eq!(name.host, "ghcr.io");
        assert_eq!(name.namespace, "cirruslabs/macos-tahoe-base");
        assert_eq!(name.reference, Reference::Tag("latest".into()));

        let name = parse("localhost:5000/a/b/c");
        assert_eq!(name.host, "localhost:5000");
        assert_eq!(name.namespace, "a/b/c");
        assert_eq!(name.to_string(), "localhost:5000/a/b/c:latest");

        let digest = format!("sha256:{}", "ab".repeat(32));
        let name = parse(&format!("127.0.0.1:5000/vm@{digest}"));
        assert_eq!(name.reference, Reference::Digest(digest.clone()));
        assert_eq!(name.to_string(), format!("127.0.0.1:5000/vm@{digest}"));
        assert_eq!(parse("my-host/ns_x.y/vm:v1.2-rc_3").reference.value(), "v1.2-rc_3");
    }

    #[test]
    fn local_names_and_garbage_do_not_parse() {
        for bad in [
            "debian",
            "debian:latest",
            "ghcr.io/",
            "ghcr.io/../etc",
            "ghcr.io/a/../b",
            "ghcr.io/a/./b",
            "ghcr.io/a//b",
            "gh_cr.io/a",
            "ghcr.io:port/a",
            "ghcr.io/a:",
            "ghcr.io/a:-x",
            "ghcr.io/a@sha256:abc",
            "ghcr.io/a@md5:0123456789abcdef0123456789abcdef",
            "ghcr.io/ümlaut",
            "http://ghcr.io/a",
            "ghcr.io/a b",
        ] {
            assert!(bad.parse::<RemoteName>().is_err(), "{bad} should not parse");
        }
    }
}
