//! The REST client for the `all_member_push` attribute APIs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use tracing::{debug, warn};

use super::door::{Door, Slot, Ticket};
use super::errors::{classify, Class, Reply};
use super::ratelimit::Lowering;
use super::tap::RateTap;
use super::usersig::Signer;
use crate::config::{Config, RateLimitScope};
use crate::fence::Fence;

/// The API's names under `v4/all_member_push/`.
pub mod api {
    /// Sets attributes.
    pub const SET_ATTR: &str = "im_set_attr";
    /// Removes attributes.
    pub const REMOVE_ATTR: &str = "im_remove_attr";
    /// Reads attributes.
    pub(crate) const GET_ATTR: &str = "im_get_attr";
    /// Reads the app's attribute names.
    pub(crate) const GET_ATTR_NAME: &str = "im_get_attr_name";
}

/// The common response envelope plus the fields of the sibling APIs.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub(crate) struct ApiResponse {
    /// `OK` or `FAIL`.
    #[serde(rename = "ActionStatus", default)]
    pub(crate) action_status: String,
    /// 0 on success.
    #[serde(rename = "ErrorCode", default)]
    pub(crate) error_code: i64,
    /// Human-readable error.
    #[serde(rename = "ErrorInfo", default)]
    pub(crate) error_info: String,
    /// `im_get_attr`'s answer.
    #[serde(rename = "UserAttrs", default, skip_serializing_if = "Option::is_none")]
    pub(crate) user_attrs: Option<Vec<UserAttrs>>,
    /// `im_get_attr_name`'s answer.
    #[serde(rename = "AttrNames", default, skip_serializing_if = "Option::is_none")]
    pub(crate) attr_names: Option<BTreeMap<String, String>>,
}

impl ApiResponse {
    /// A success envelope.
    pub(crate) fn ok() -> Self {
        ApiResponse {
            action_status: "OK".into(),
            ..Default::default()
        }
    }
    /// A failure envelope.
    pub(crate) fn fail(code: i64, info: impl Into<String>) -> Self {
        ApiResponse {
            action_status: "FAIL".into(),
            error_code: code,
            error_info: info.into(),
            ..Default::default()
        }
    }
}

/// One account's attributes, as the API spells it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub(crate) struct UserAttrs {
    /// The account.
    #[serde(rename = "To_Account")]
    pub(crate) to_account: String,
    /// Attribute name → value.
    #[serde(rename = "Attrs", default)]
    pub(crate) attrs: BTreeMap<String, String>,
}

/// Serialises `[(name, value)]` as a JSON object, without copying.
pub(crate) struct AttrPairs<'a>(pub &'a [(&'a str, &'a str)]);

impl Serialize for AttrPairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct EntryRef<'a> {
    #[serde(rename = "To_Account")]
    to_account: &'a str,
    #[serde(rename = "Attrs")]
    attrs: AttrPairs<'a>,
}

/// Builds an `im_set_attr` body from `(account, attributes)` pairs.
pub fn set_attr_body<'a>(entries: &'a [(&'a str, Vec<(&'a str, &'a str)>)]) -> Vec<u8> {
    let list: Vec<EntryRef<'a>> = entries
        .iter()
        .map(|(to_account, attrs)| EntryRef {
            to_account,
            attrs: AttrPairs(attrs),
        })
        .collect();
    let mut out = Vec::with_capacity(64 + list.len() * 64);
    out.extend_from_slice(b"{\"UserAttrs\":");
    serde_json::to_writer(&mut out, &list).expect("serialising strings cannot fail");
    out.push(b'}');
    out
}

#[derive(Serialize)]
struct RemoveRef<'a> {
    #[serde(rename = "To_Account")]
    to_account: &'a str,
    #[serde(rename = "Attrs")]
    attrs: &'a [&'a str],
}

/// Builds an `im_remove_attr` body from `(account, attribute names)` pairs:
/// `{"UserAttrs":[{"To_Account":"a","Attrs":["sex","city"]}]}`.
pub fn remove_attr_body<'a>(entries: &'a [(&'a str, Vec<&'a str>)]) -> Vec<u8> {
    let list: Vec<RemoveRef<'a>> = entries
        .iter()
        .map(|(to_account, attrs)| RemoveRef { to_account, attrs })
        .collect();
    let mut out = Vec::with_capacity(64 + list.len() * 48);
    out.extend_from_slice(b"{\"UserAttrs\":");
    serde_json::to_writer(&mut out, &list).expect("serialising strings cannot fail");
    out.push(b'}');
    out
}

/// The outcome of one call: the raw reply, its class, and the parsed body.
#[derive(Debug, Clone)]
pub struct CallResult {
    /// What came back.
    pub reply: Reply,
    /// Its class, as `tencent::errors::classify` decides.
    pub class: Class,
    /// The parsed body when there was one.
    pub(crate) body: Option<ApiResponse>,
    /// How long the request took.
    pub(crate) latency: Duration,
}

/// An error of the convenience calls used by the operator tools (and the
/// worker's attribute-name reads); it names the ErrorCode when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{api} failed ({class}{}): {info}", if *.code != 0 { format!(", ErrorCode {}", .code) } else { String::new() })]
pub struct ApiError {
    /// The API called.
    pub(crate) api: &'static str,
    /// The class of the answer.
    pub(crate) class: Class,
    /// ErrorCode, 0 when none.
    pub(crate) code: i64,
    /// What went wrong.
    pub(crate) info: String,
}

/// The client. Cheap to clone; all clones share the pool, signer and limiter.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
    signer: Arc<Signer>,
    /// The in-flight bound and the rate limiter, shared by all clones.
    door: Arc<Door>,
    /// Where the requests sent are counted, when a test measures them.
    tap: Option<Arc<RateTap>>,
}

impl Client {
    /// Builds a client from the configuration (which must pass `validate_api`).
    pub(crate) fn from_config(config: &Config) -> anyhow::Result<Client> {
        let t = &config.tencent;
        Ok(Client::new(
            &config.api_base_url(),
            Arc::new(Signer::from_config(t)),
            t.timeout(),
            t.rate_limit_per_sec,
            t.max_in_flight,
        )?
        .with_rate_limit_scope(t.rate_limit_scope, t.rate_limit_per_sec, t.max_in_flight))
    }

    /// The same client with its rate budget counted as `scope` says
    /// (`Client::new` makes one budget shared by every API).
    pub fn with_rate_limit_scope(
        mut self,
        scope: RateLimitScope,
        rate_limit_per_sec: u32,
        max_in_flight: usize,
    ) -> Client {
        if scope == RateLimitScope::PerApi {
            self.door = Arc::new(Door::per_api(
                rate_limit_per_sec,
                max_in_flight,
                self.tap.clone(),
                &[api::REMOVE_ATTR],
            ));
        }
        self
    }

    /// Builds a client for `base_url` (e.g. `https://console.tim.qq.com`).
    pub fn new(
        base_url: &str,
        signer: Arc<Signer>,
        timeout: Duration,
        rate_limit_per_sec: u32,
        max_in_flight: usize,
    ) -> anyhow::Result<Client> {
        use anyhow::Context;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(max_in_flight.max(1) * 2)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        // Exported from the start, before the first request sets it again.
        metrics::gauge!("imattr_rate_limit_current").set(f64::from(rate_limit_per_sec));
        let tap = super::tap::find(base_url);
        Ok(Client {
            http,
            base: base_url.trim_end_matches('/').into(),
            signer,
            door: Arc::new(Door::new(rate_limit_per_sec, max_in_flight, tap.clone())),
            tap,
        })
    }

    /// The UserSig source every request of this client signs with.
    pub fn signer(&self) -> &Arc<Signer> {
        &self.signer
    }

    /// The door every request leaves by (in-flight bound, rate limiter).
    pub(crate) fn door(&self) -> &Arc<Door> {
        &self.door
    }

    /// The full URL of `api`, with a fresh `random` (carries the usersig: never log it).
    fn url(&self, api: &str) -> String {
        let random: u32 = rand::random();
        let mut u = format!("{}/v4/all_member_push/{api}?", self.base);
        url::form_urlencoded::Serializer::for_suffix(&mut u, 0)
            .append_pair("usersig", &self.signer.usersig())
            .append_pair("identifier", self.signer.identifier())
            .append_pair("sdkappid", &self.signer.sdkappid().to_string())
            .append_pair("random", &random.to_string())
            .append_pair("contenttype", "json")
            .finish();
        u
    }

    /// Sends one request with a JSON body through the door (an in-flight
    /// permit, then a rate slot) on behalf of no broker session. Never
    /// fails: every failure is a [`Reply`].
    pub async fn call(&self, api: &str, body: Vec<u8>) -> CallResult {
        self.call_unfenced(api, body, Slot::Reserve).await
    }

    /// [`Client::call`] with an open fence (nothing to lose), in `slot`.
    async fn call_unfenced(&self, api: &str, body: Vec<u8>, slot: Slot) -> CallResult {
        let open = Fence::open();
        let ticket = self.door.ticket();
        match self
            .door
            .pass(api, ticket, &open, slot, || self.send(api, body))
            .await
        {
            Some(r) => r,
            // An open fence never closes; not worth a panic all the same.
            None => CallResult {
                reply: Reply::Connection("not sent".into()),
                class: Class::Transient,
                body: None,
                latency: Duration::ZERO,
            },
        }
    }

    /// Sends one request through the door (`tencent::door`): an in-flight
    /// permit, a rate slot, then `fence` checked right before it leaves.
    /// None, and nothing sent, when the fence closes first (a lost session
    /// must not send while another one may hold the same messages). Every
    /// request of a broker session goes through here, whatever its API.
    pub(crate) async fn call_fenced(
        &self,
        api: &str,
        body: Vec<u8>,
        ticket: Ticket,
        fence: &Fence,
    ) -> Option<CallResult> {
        self.door
            .pass(api, ticket, fence, Slot::Reserve, || self.send(api, body))
            .await
    }

    async fn send(&self, api: &str, body: Vec<u8>) -> CallResult {
        metrics::gauge!("imattr_rate_limit_current").set(self.door.limiter_for(api).current_rate());
        let started = tokio::time::Instant::now();
        if let Some(t) = &self.tap {
            t.sent();
        }
        let sent = self
            .http
            .post(self.url(api))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let (reply, parsed) = match sent {
            Err(e) => (transport_reply(e), None),
            Ok(resp) if resp.status() != reqwest::StatusCode::OK => {
                (Reply::HttpStatus(resp.status().as_u16()), None)
            }
            Ok(resp) => match resp.bytes().await {
                Err(e) => (transport_reply(e), None),
                Ok(bytes) => match serde_json::from_slice::<ApiResponse>(&bytes) {
                    Ok(r) if r.action_status.is_empty() => (
                        Reply::Unparseable("the body has no ActionStatus".into()),
                        None,
                    ),
                    Ok(r) => (
                        Reply::Body {
                            action_ok: r.action_status == "OK",
                            code: r.error_code,
                            info: r.error_info.clone(),
                        },
                        Some(r),
                    ),
                    Err(e) => (Reply::Unparseable(e.to_string()), None),
                },
            },
        };
        let class = classify(&reply);
        if class == Class::RateLimited {
            self.on_rate_limited(api, &reply);
        }
        CallResult {
            reply,
            class,
            body: parsed,
            latency: started.elapsed(),
        }
    }

    /// Lowers the rate (at most once a second) and says so once per episode.
    fn on_rate_limited(&self, api: &str, reply: &Reply) {
        metrics::counter!("imattr_rate_limited_total").increment(1);
        let limiter = self.door.limiter_for(api);
        match limiter.on_rate_limited() {
            Lowering::NewEpisode(rate) => {
                metrics::gauge!("imattr_rate_limit_current").set(rate);
                warn!(
                    api,
                    code = reply.code(),
                    rate_per_sec = rate,
                    configured_per_sec = limiter.max_rate(),
                    "The API refuses requests for their rate; lowering the request rate for a while"
                );
            }
            Lowering::Lowered(rate) => {
                metrics::gauge!("imattr_rate_limit_current").set(rate);
                debug!(
                    api,
                    code = reply.code(),
                    rate_per_sec = rate,
                    "Still refused for rate; lowering the request rate again"
                );
            }
            Lowering::Unchanged => {}
        }
    }

    async fn call_json<T: Serialize>(
        &self,
        api: &'static str,
        body: &T,
    ) -> Result<ApiResponse, ApiError> {
        self.call_json_in(api, body, false).await
    }

    /// [`Client::call_json`]; with `free_slot`, each attempt leaves only in a
    /// rate slot free when it does, never reserving one ahead of a batch.
    async fn call_json_in<T: Serialize>(
        &self,
        api: &'static str,
        body: &T,
        free_slot: bool,
    ) -> Result<ApiResponse, ApiError> {
        let bytes = serde_json::to_vec(body).expect("request types always serialise");
        let mut renewed = false;
        loop {
            let r = if free_slot {
                self.call_in_free_slot(api, bytes.clone()).await
            } else {
                self.call(api, bytes.clone()).await
            };
            match (r.class, r.body) {
                (Class::Success, Some(b)) => return Ok(b),
                (Class::Signature, _) if !renewed && self.signer.invalidate() => renewed = true,
                (class, _) => {
                    return Err(ApiError {
                        api,
                        class,
                        code: r.reply.code(),
                        info: r.reply.info(),
                    })
                }
            }
        }
    }

    /// `im_get_attr` for up to any number of accounts (sent 100 at a time).
    pub(crate) async fn get_attr(&self, accounts: &[String]) -> Result<Vec<UserAttrs>, ApiError> {
        let mut out = Vec::with_capacity(accounts.len());
        for chunk in accounts.chunks(100) {
            let r = self
                .call_json(api::GET_ATTR, &serde_json::json!({ "To_Account": chunk }))
                .await?;
            out.extend(r.user_attrs.unwrap_or_default());
        }
        Ok(out)
    }

    /// `im_get_attr_name`: the app's attribute names by slot ("0" to "9").
    pub async fn get_attr_names(&self) -> Result<BTreeMap<String, String>, ApiError> {
        let r = self
            .call_json(api::GET_ATTR_NAME, &serde_json::json!({}))
            .await?;
        Ok(r.attr_names.unwrap_or_default())
    }

    /// [`Client::get_attr_names`] as a probe of the credentials while
    /// batches are being sent: in a free rate slot only, so that no batch
    /// waits for a slot it took.
    pub(crate) async fn probe_attr_names(&self) -> Result<BTreeMap<String, String>, ApiError> {
        let r = self
            .call_json_in(api::GET_ATTR_NAME, &serde_json::json!({}), true)
            .await?;
        Ok(r.attr_names.unwrap_or_default())
    }

    /// Sends in the first rate slot free when it is tried (as batches do),
    /// through the door like every request.
    async fn call_in_free_slot(&self, api: &str, body: Vec<u8>) -> CallResult {
        self.call_unfenced(api, body, Slot::WhenFree).await
    }
}

/// A transport failure as a [`Reply`], with the URL (and its usersig) stripped.
fn transport_reply(e: reqwest::Error) -> Reply {
    if e.is_timeout() {
        return Reply::Timeout;
    }
    let e = e.without_url();
    let text = format!("{e}{}", crate::telemetry::sources(&e));
    Reply::Connection(strip_query(&text))
}

/// Belt and braces: removes any `?query` that might still be in a message.
fn strip_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    for c in text.chars() {
        if c == '?' {
            in_query = true;
            out.push_str("?<redacted>");
            continue;
        }
        if in_query && (c.is_whitespace() || c == ')' || c == '"') {
            in_query = false;
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let body = set_attr_body(&[
            ("u1", vec![("sex", "m"), ("city", "x\"y")]),
            ("u2", vec![("city", "z")]),
        ]);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"UserAttrs":[{"To_Account":"u1","Attrs":{"sex":"m","city":"x\"y"}},{"To_Account":"u2","Attrs":{"city":"z"}}]}"#
        );
    }

    #[test]
    fn remove_body_shape() {
        let body = remove_attr_body(&[("u1", vec!["sex", "c\"ity"]), ("u2", vec!["city"])]);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"UserAttrs":[{"To_Account":"u1","Attrs":["sex","c\"ity"]},{"To_Account":"u2","Attrs":["city"]}]}"#
        );
    }

    #[test]
    fn strip_query_removes_usersig() {
        let s = strip_query("error sending request for url (http://h/x?usersig=SECRET&a=b): boom");
        assert!(!s.contains("SECRET"), "{s}");
        assert!(s.contains("boom"));
    }
}
