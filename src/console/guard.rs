//! What a request that changes anything must show: that a page of the console
//! itself sent it (same origin, by `Sec-Fetch-Site` and `Origin`), and the
//! console's CSRF token. Browsers send credentials (HTTP basic) with any
//! request, so neither alone is enough: the origin headers are what a
//! browser can vouch for, the token what another site cannot read.

use axum::http::header::{HOST, ORIGIN};
use axum::http::{HeaderMap, Method};

use super::auth::ct_eq;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not sent by a page of this origin.
    #[error("refused: not a same-origin request ({0})")]
    CrossOrigin(String),
    /// Without the CSRF token, or with another.
    #[error("refused: the CSRF token is missing or wrong; reload the page and try again")]
    Csrf,
    /// `console.read_only`.
    #[error("refused: the console is read-only (console.read_only)")]
    ReadOnly,
}

/// Whether `method` may change anything (everything but GET, HEAD, OPTIONS).
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Same origin: `Sec-Fetch-Site`, when sent, must say `same-origin`; `Origin`,
/// when sent, must name the host the request was sent to; one of them must be
/// there (every current browser sends both on a POST).
pub fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let site = headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = site {
        if site != "same-origin" {
            return Err(Refusal::CrossOrigin(format!("Sec-Fetch-Site: {site}")));
        }
    }
    match headers.get(ORIGIN).map(|v| v.to_str().unwrap_or("?")) {
        Some(origin) => {
            let host = headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if origin_host(origin).is_some_and(|o| o.eq_ignore_ascii_case(host)) && !host.is_empty()
            {
                Ok(())
            } else {
                Err(Refusal::CrossOrigin(format!(
                    "Origin {origin} is not this console's"
                )))
            }
        }
        None if site.is_some() => Ok(()),
        None => Err(Refusal::CrossOrigin(
            "neither Sec-Fetch-Site nor Origin was sent".into(),
        )),
    }
}

/// `host[:port]` of an origin such as `http://127.0.0.1:9464` (None for `null`).
fn origin_host(origin: &str) -> Option<&str> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// The CSRF token sent (header `X-CSRF-Token`, else the form field `csrf`)
/// is the console's.
pub fn csrf_ok(headers: &HeaderMap, form_field: Option<&str>, token: &str) -> bool {
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form_field);
    sent.is_some_and(|s| ct_eq(s.as_bytes(), token.as_bytes()))
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
pub fn form_value(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A fresh random token (hex, 256 bits).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn same_origin_decisions() {
        let host = ("host", "127.0.0.1:9464");
        // What a browser sends from a console page.
        assert_eq!(
            same_origin(&h(&[
                host,
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://127.0.0.1:9464")
            ])),
            Ok(())
        );
        // Older browsers: Origin only.
        assert_eq!(
            same_origin(&h(&[host, ("origin", "http://127.0.0.1:9464")])),
            Ok(())
        );
        // Another port of the same host is another origin ("same-site").
        for bad in [
            h(&[
                host,
                ("sec-fetch-site", "same-site"),
                ("origin", "http://127.0.0.1:8080"),
            ]),
            h(&[host, ("sec-fetch-site", "cross-site")]),
            h(&[host, ("sec-fetch-site", "none")]),
            h(&[host, ("origin", "http://127.0.0.1:8080")]),
            h(&[host, ("origin", "null")]),
            h(&[
                host,
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://evil.example"),
            ]),
            // curl: nothing a browser would vouch for.
            h(&[host]),
        ] {
            assert!(
                matches!(same_origin(&bad), Err(Refusal::CrossOrigin(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn csrf_from_header_or_form() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
        assert!(csrf_ok(&h(&[("x-csrf-token", &t)]), None, &t));
        assert!(csrf_ok(&HeaderMap::new(), Some(&t), &t));
        assert!(!csrf_ok(&HeaderMap::new(), None, &t));
        assert!(!csrf_ok(&HeaderMap::new(), Some("x"), &t));
        assert!(!csrf_ok(&h(&[("x-csrf-token", "x")]), Some(&t), &t));
        let body = format!("ids=1&csrf={t}&ids=2");
        assert_eq!(
            form_value(body.as_bytes(), "csrf").as_deref(),
            Some(t.as_str())
        );
        assert_eq!(form_value(b"a=1", "csrf"), None);
    }

    #[test]
    fn only_reads_are_free() {
        assert!(!changes_state(&Method::GET));
        assert!(!changes_state(&Method::HEAD));
        assert!(changes_state(&Method::POST));
        assert!(changes_state(&Method::DELETE));
    }
}
