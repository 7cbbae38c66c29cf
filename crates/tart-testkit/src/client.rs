//! A small blocking registry client that authenticates the way real clients do: try, read the
//! `WWW-Authenticate` challenge of the 401, then answer it with Basic credentials or a bearer token from
//! the challenge's realm.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use data_encoding::BASE64;
use ureq::http::{self, HeaderMap};

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub(crate) struct Client {
    agent: ureq::Agent,
    credentials: Option<(String, String)>,
    /// The `Authorization` value that answered the last challenge, reused until the registry refuses it.
    authorization: Mutex<Option<String>>,
}

impl Client {
    pub(crate) fn new(credentials: Option<(String, String)>) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            credentials,
            authorization: Mutex::new(None),
        }
    }

    pub(crate) fn send(&self, method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        let cached = self
            .authorization
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let reply = self.send_once(method, url, headers, body, cached.as_deref());
        if reply.status != 401 {
            return reply;
        }
        let Some(challenge) = reply.header("www-authenticate").map(str::to_owned) else {
            return reply;
        };
        let Some(authorization) = self.answer(&challenge) else {
            return reply;
        };
        *self.authorization.lock().unwrap_or_else(PoisonError::into_inner) = Some(authorization.clone());
        self.send_once(method, url, headers, body, Some(&authorization))
    }

    fn send_once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        authorization: Option<&str>,
    ) -> Reply {
        let mut request = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        let result = match body {
            Some(body) => self.agent.run(request.body(body).expect("valid request")),
            None => self.agent.run(request.body(()).expect("valid request")),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let body = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body,
        }
    }

    fn answer(&self, challenge: &str) -> Option<String> {
        let (scheme, params) = parse_challenge(challenge)?;
        let basic = self
            .credentials
            .as_ref()
            .map(|(user, password)| format!("Basic {}", BASE64.encode(format!("{user}:{password}").as_bytes())));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let param = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let mut url = format!("{}?", param("realm")?);
        for name in ["service", "scope"] {
            if let Some(value) = param(name) {
                url.push_str(&format!("{name}={}&", form_encode(value)));
            }
        }
        let auth: Vec<(&str, &str)> = basic.iter().map(|b| ("Authorization", b.as_str())).collect();
        let reply = self.send_once("GET", url.trim_end_matches(['?', '&']), &auth, None, None);
        if reply.status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        let token = json.get("token").or_else(|| json.get("access_token"))?.as_str()?;
        Some(format!("Bearer {token}"))
    }
}

/// Splits `Bearer realm="…",service="…",scope="repository:a:pull,push"` into the scheme and its
/// parameters; quoted values may contain commas.
pub(crate) fn parse_challenge(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    let (scheme, mut rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            break;
        }
        let (name, after) = rest.split_once('=')?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        params.push((name.trim().to_owned(), value.to_owned()));
        rest = after;
    }
    Some((scheme.to_owned(), params))
}

fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_with_commas_in_quoted_values_parse() {
        let (scheme, params) =
            parse_challenge(r#"Bearer realm="http://127.0.0.1:1/token",service="s",scope="repository:a/b:pull,push""#)
                .unwrap();
        assert_eq!(scheme, "Bearer");
        let expected = [
            ("realm", "http://127.0.0.1:1/token"),
            ("service", "s"),
            ("scope", "repository:a/b:pull,push"),
        ];
        assert_eq!(params, expected.map(|(n, v)| (n.to_owned(), v.to_owned())));
    }
}
