//! How the simulator answers one API request: Tencent's checks in the order
//! it applies them, then the injected faults, then the effect.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use rand::Rng;

use super::{Faults, RateLimitScope, Shared};
use crate::tencent::client::{ApiResponse, UserAttrs};
use crate::tencent::usersig::{unix_now, verify_usersig, UserSigError};

/// An HTTP status and body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) body: ApiResponse,
}

impl Answer {
    fn ok(body: ApiResponse) -> Self {
        Answer {
            status: StatusCode::OK,
            body,
        }
    }
    fn fail(code: i64, info: impl Into<String>) -> Self {
        Answer::ok(ApiResponse::fail(code, info))
    }
}

/// A check passes with a value or ends the request with its answer.
type Check<T> = Result<T, Answer>;

/// The answer to one request to `api` (a known API).
pub(super) async fn answer(s: &Shared, api: &str, query: &str, body: &[u8]) -> Answer {
    match checked(s, api, query, body).await {
        Ok(a) | Err(a) => a,
    }
}

async fn checked(s: &Shared, api: &str, query: &str, body: &[u8]) -> Check<Answer> {
    let q = check_query(query)?;
    check_sdkappid(s, q.sdkappid)?;
    check_usersig(s, &q)?;
    check_admin(s, &q)?;
    let faults = s.lock().faults.clone();
    check_limit(s, api, &faults)?;
    check_misconfigured(&faults)?;
    let request = check_body(api, body)?;
    let accounts = request.accounts();
    let _busy = Busy::mark(s, &accounts);
    let drawn = draw(s, &faults);
    if drawn.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(drawn.latency_ms)).await;
    }
    check_faults(&drawn, &faults, &accounts)?;
    Ok(match request {
        Request::SetAttr(list) => set_attr(s, &faults, list),
        Request::RemoveAttr(list) => remove_attr(s, &faults, list),
        Request::Other(json) => other_api(s, api, &json),
    })
}

/// The query string's parameters, all present.
struct Query {
    params: HashMap<String, String>,
    sdkappid: u64,
}

fn check_query(query: &str) -> Check<Query> {
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for p in ["usersig", "identifier", "sdkappid", "random", "contenttype"] {
        if params.get(p).is_none_or(|v| v.is_empty()) {
            return Err(Answer::fail(60002, format!("missing query parameter {p}")));
        }
    }
    if params["contenttype"] != "json" {
        return Err(Answer::fail(60002, "contenttype must be json"));
    }
    if params["random"].parse::<u32>().is_err() {
        return Err(Answer::fail(
            60002,
            "random must be a 32-bit unsigned integer",
        ));
    }
    let Ok(sdkappid) = params["sdkappid"].parse::<u64>() else {
        return Err(Answer::fail(60002, "sdkappid must be a number"));
    };
    Ok(Query { params, sdkappid })
}

fn check_sdkappid(s: &Shared, sdkappid: u64) -> Check<()> {
    if sdkappid != s.sdkappid {
        return Err(Answer::fail(70020, "SDKAppID not found"));
    }
    Ok(())
}

fn check_usersig(s: &Shared, q: &Query) -> Check<()> {
    let verified = verify_usersig(
        &q.params["usersig"],
        &s.secret_key,
        q.sdkappid,
        &q.params["identifier"],
        unix_now(),
    );
    match verified {
        Ok(_) => Ok(()),
        Err(UserSigError::Undecodable(e)) => {
            Err(Answer::fail(70003, format!("usersig invalid: {e}")))
        }
        Err(UserSigError::BadSignature) => Err(Answer::fail(70005, "usersig signature mismatch")),
        Err(UserSigError::Expired { .. }) => Err(Answer::fail(70001, "usersig expired")),
        Err(UserSigError::IdentifierMismatch { .. }) => Err(Answer::fail(
            70013,
            "usersig identifier does not match the request",
        )),
        Err(UserSigError::SdkAppIdMismatch { .. }) => Err(Answer::fail(
            70014,
            "usersig sdkappid does not match the request",
        )),
    }
}

fn check_admin(s: &Shared, q: &Query) -> Check<()> {
    if q.params["identifier"] != s.identifier {
        return Err(Answer::fail(
            60010,
            "the request requires the app administrator",
        ));
    }
    Ok(())
}

fn check_limit(s: &Shared, api: &str, faults: &Faults) -> Check<()> {
    let now = tokio::time::Instant::now();
    let mut st = s.lock();
    if st.refuse_until.is_some_and(|t| now < t) {
        return Err(Answer::fail(60007, "request frequency limit exceeded"));
    }
    // Shared: every API of the family counts on one budget.
    let key = match faults.rate_limit_scope {
        RateLimitScope::PerApi => api,
        RateLimitScope::Shared => "all_member_push",
    };
    let limiter = st.limiters.entry(key.to_string()).or_default();
    if !limiter.admit(faults.rate_limit_mode, faults.rate_limit, now) {
        return Err(Answer::fail(60007, "request frequency limit exceeded"));
    }
    Ok(())
}

fn check_misconfigured(faults: &Faults) -> Check<()> {
    if faults.misconfigured {
        return Err(Answer::fail(
            90009,
            "the request requires app admin permissions",
        ));
    }
    Ok(())
}

/// One account's entry of an `im_remove_attr` request: the names to remove.
pub(super) struct Removal {
    to_account: String,
    attrs: Vec<String>,
}

/// A request whose body parsed.
enum Request {
    SetAttr(Vec<UserAttrs>),
    RemoveAttr(Vec<Removal>),
    Other(serde_json::Value),
}

impl Request {
    /// The accounts an `im_set_attr` or `im_remove_attr` request writes, in order.
    fn accounts(&self) -> Vec<String> {
        match self {
            Request::SetAttr(list) => list.iter().map(|u| u.to_account.clone()).collect(),
            Request::RemoveAttr(list) => list.iter().map(|u| u.to_account.clone()).collect(),
            Request::Other(_) => Vec::new(),
        }
    }
}

fn check_body(api: &str, body: &[u8]) -> Check<Request> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err(Answer::fail(90001, "failed to parse the JSON body"));
    };
    match api {
        "im_set_attr" => parse_user_attrs(&json).map(Request::SetAttr),
        "im_remove_attr" => parse_removals(&json).map(Request::RemoveAttr),
        _ => Ok(Request::Other(json)),
    }
}

/// `UserAttrs`, the list both write APIs take.
fn user_attrs_list(json: &serde_json::Value) -> Check<&Vec<serde_json::Value>> {
    json.get("UserAttrs")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Answer::fail(90001, "UserAttrs must be an array"))
}

/// An entry's `To_Account`, checked the same way by both write APIs.
fn to_account(entry: &serde_json::Value) -> Check<&str> {
    entry
        .get("To_Account")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Answer::fail(90001, "To_Account must be a string"))
}

/// `{"UserAttrs":[{"To_Account":"a","Attrs":["sex","city"]}]}`.
fn parse_removals(json: &serde_json::Value) -> Check<Vec<Removal>> {
    let list = user_attrs_list(json)?;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let to = to_account(e)?;
        let Some(attrs) = e.get("Attrs").and_then(|v| v.as_array()) else {
            return Err(Answer::fail(90001, "Attrs must be an array of names"));
        };
        let mut names = Vec::with_capacity(attrs.len());
        for n in attrs {
            let Some(n) = n.as_str() else {
                return Err(Answer::fail(90033, "attribute names must be strings"));
            };
            names.push(n.to_string());
        }
        out.push(Removal {
            to_account: to.to_string(),
            attrs: names,
        });
    }
    Ok(out)
}

fn parse_user_attrs(json: &serde_json::Value) -> Check<Vec<UserAttrs>> {
    let list = user_attrs_list(json)?;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let to = to_account(e)?;
        let Some(attrs) = e.get("Attrs").and_then(|v| v.as_object()) else {
            return Err(Answer::fail(90001, "Attrs must be an object"));
        };
        let mut m = BTreeMap::new();
        for (k, v) in attrs {
            let Some(v) = v.as_str() else {
                return Err(Answer::fail(
                    90033,
                    format!("attribute {k} must be a string"),
                ));
            };
            m.insert(k.clone(), v.to_string());
        }
        out.push(UserAttrs {
            to_account: to.to_string(),
            attrs: m,
        });
    }
    Ok(out)
}

/// Marks accounts as in a request until dropped, so a request abandoned
/// mid-way (its connection closed during the latency) leaves none behind.
pub(super) struct Busy<'a> {
    s: &'a Shared,
    accounts: Vec<String>,
}

impl<'a> Busy<'a> {
    /// Marks each distinct account once, counting duplicates and overlaps.
    pub(super) fn mark(s: &'a Shared, accounts: &[String]) -> Self {
        let mut st = s.lock();
        let mut seen = HashSet::new();
        let mut marked = Vec::with_capacity(accounts.len());
        for a in accounts {
            if !seen.insert(a) {
                continue;
            }
            let n = st.busy_accounts.entry(a.clone()).or_default();
            *n += 1;
            if *n > 1 {
                st.stats.overlapping_account_requests += 1;
            }
            marked.push(a.clone());
        }
        if seen.len() < accounts.len() {
            st.stats.requests_with_duplicate_accounts += 1;
        }
        st.stats.max_accounts_in_request = st.stats.max_accounts_in_request.max(accounts.len());
        Busy {
            s,
            accounts: marked,
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = self.s.lock();
        for a in &self.accounts {
            if let Some(n) = st.busy_accounts.get_mut(a) {
                *n -= 1;
                if *n == 0 {
                    st.busy_accounts.remove(a);
                }
            }
        }
    }
}

/// The random faults of one request, drawn in a fixed order so a seed
/// always gives the same sequence.
struct Drawn {
    latency_ms: u64,
    fail: bool,
    http_fail: bool,
}

fn draw(s: &Shared, faults: &Faults) -> Drawn {
    let mut st = s.lock();
    let rng = &mut st.rng;
    let (lo, hi) = faults.latency_ms;
    let latency_ms = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
    Drawn {
        latency_ms,
        fail: faults.fail_rate > 0.0 && rng.gen_bool(faults.fail_rate.min(1.0)),
        http_fail: faults.http_error_rate > 0.0 && rng.gen_bool(faults.http_error_rate.min(1.0)),
    }
}

fn check_faults(drawn: &Drawn, faults: &Faults, accounts: &[String]) -> Check<()> {
    if drawn.http_fail {
        return Err(Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ApiResponse::default(),
        });
    }
    if drawn.fail || accounts.iter().any(|a| faults.fail_accounts.contains(a)) {
        return Err(Answer::fail(91000, "internal service error, try again"));
    }
    Ok(())
}

fn check_set_attr(names: &HashSet<&String>, faults: &Faults, list: &[UserAttrs]) -> Check<()> {
    check_accounts(faults, list.iter().map(|u| u.to_account.as_str()))?;
    for u in list {
        check_names(names, faults, &u.to_account, u.attrs.keys())?;
        for (k, v) in &u.attrs {
            if v.len() > 50 {
                return Err(Answer::fail(
                    90033,
                    format!("invalid attribute: value of {k} over 50 bytes"),
                ));
            }
        }
    }
    Ok(())
}

/// The checks on a request's accounts, common to `im_set_attr` and
/// `im_remove_attr`: how many, and the injected refusals.
fn check_accounts<'a>(
    faults: &Faults,
    accounts: impl ExactSizeIterator<Item = &'a str>,
) -> Check<()> {
    let n = accounts.len();
    if n > faults.max_accounts {
        return Err(Answer::fail(
            90018,
            format!("{n} accounts, over the limit of {}", faults.max_accounts),
        ));
    }
    for a in accounts {
        if faults.reject_accounts.iter().any(|r| r == a) {
            return Err(Answer::fail(90033, format!("invalid account: {a}")));
        }
    }
    Ok(())
}

/// The checks on one account's attribute names, common to `im_set_attr`
/// and `im_remove_attr`: at most 10, registered, not refused by a fault.
fn check_names<'a>(
    names: &HashSet<&String>,
    faults: &Faults,
    account: &str,
    attrs: impl ExactSizeIterator<Item = &'a String>,
) -> Check<()> {
    if attrs.len() > 10 {
        return Err(Answer::fail(
            90033,
            format!("{account}: more than 10 attributes"),
        ));
    }
    for k in attrs {
        if faults.reject_attrs.contains(k) {
            return Err(Answer::fail(90033, format!("invalid attribute: {k}")));
        }
        if !names.contains(k) {
            return Err(Answer::fail(
                90033,
                format!("invalid attribute: {k} is not registered"),
            ));
        }
    }
    Ok(())
}

fn remove_attr(s: &Shared, faults: &Faults, list: Vec<Removal>) -> Answer {
    let mut guard = s.lock();
    let st = &mut *guard;
    let names: HashSet<&String> = st.names.values().collect();
    if let Err(a) = check_accounts(faults, list.iter().map(|u| u.to_account.as_str())) {
        return a;
    }
    for u in &list {
        if let Err(a) = check_names(&names, faults, &u.to_account, u.attrs.iter()) {
            return a;
        }
    }
    let n = list.len() as u64;
    for u in list {
        if let Some(stored) = st.store.get_mut(&u.to_account) {
            for k in &u.attrs {
                stored.remove(k);
            }
            if stored.is_empty() {
                st.store.remove(&u.to_account);
            }
        }
    }
    st.stats.accounts_removed += n;
    st.stats.remove_attr_ok += 1;
    Answer::ok(ApiResponse::ok())
}

/// Whether writing `new` over `old` moves an integer value backwards.
fn regresses(old: Option<&String>, new: &str) -> bool {
    match (old.and_then(|o| o.parse::<i64>().ok()), new.parse::<i64>()) {
        (Some(o), Ok(n)) => n < o,
        _ => false,
    }
}

fn set_attr(s: &Shared, faults: &Faults, list: Vec<UserAttrs>) -> Answer {
    let mut guard = s.lock();
    let st = &mut *guard;
    let names: HashSet<&String> = st.names.values().collect();
    if let Err(a) = check_set_attr(&names, faults, &list) {
        return a;
    }
    let n = list.len() as u64;
    if let Some(rec) = st.applies.as_mut() {
        let now = Instant::now();
        rec.extend(
            list.iter()
                .map(|u| (u.to_account.clone(), u.attrs.clone(), now)),
        );
    }
    for u in list {
        let stored = st.store.entry(u.to_account).or_default();
        for (k, v) in u.attrs {
            if s.monotonic_check && regresses(stored.get(&k), &v) {
                st.stats.regressions += 1;
            }
            stored.insert(k, v);
        }
    }
    st.stats.accounts_written += n;
    st.stats.set_attr_ok += 1;
    Answer::ok(ApiResponse::ok())
}

fn other_api(s: &Shared, api: &str, json: &serde_json::Value) -> Answer {
    let mut st = s.lock();
    match api {
        "im_get_attr" => {
            let Some(list) = json.get("To_Account").and_then(|v| v.as_array()) else {
                return Answer::fail(90001, "To_Account must be an array");
            };
            if list.len() > 100 {
                return Answer::fail(90018, "more than 100 accounts");
            }
            let users = list
                .iter()
                .filter_map(|a| a.as_str())
                .map(|a| UserAttrs {
                    to_account: a.to_string(),
                    attrs: st.store.get(a).cloned().unwrap_or_default(),
                })
                .collect();
            Answer::ok(ApiResponse {
                user_attrs: Some(users),
                ..ApiResponse::ok()
            })
        }
        "im_get_attr_name" => Answer::ok(ApiResponse {
            attr_names: Some(st.names.clone()),
            ..ApiResponse::ok()
        }),
        "im_set_attr_name" => {
            let Some(m) = json.get("AttrNames").and_then(|v| v.as_object()) else {
                return Answer::fail(90001, "AttrNames must be an object");
            };
            for (slot, name) in m {
                let valid_slot = slot.parse::<u8>().is_ok_and(|n| n <= 9);
                let Some(name) = name
                    .as_str()
                    .filter(|n| valid_slot && !n.is_empty() && n.len() <= 50)
                else {
                    return Answer::fail(90033, format!("invalid attribute name slot {slot}"));
                };
                st.names.insert(slot.clone(), name.to_string());
            }
            Answer::ok(ApiResponse::ok())
        }
        _ => Answer::fail(60002, "unknown API"),
    }
}
