//! A local stand-in for the Tencent Cloud Chat attribute APIs: in-memory
//! state, Tencent's own checks and codes, a frequency limit, and seeded fault
//! injection. Used by `imattr simulate`, the demo, the benchmarks and tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::tencent::client::{ApiResponse, UserAttrs};
use crate::tencent::usersig::{unix_now, verify_usersig, UserSigError};

/// The secret key the simulator uses unless told otherwise (CONTRACT §2's test key).
pub const DEFAULT_SECRET_KEY: &str =
    "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
/// The SDKAppID the simulator uses unless told otherwise.
pub const DEFAULT_SDKAPPID: u64 = 1400000000;

/// Injected faults; all can change while the simulator runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Probability that a request answers 91000.
    pub fail_rate: f64,
    /// Probability that a request answers HTTP 500.
    pub http_error_rate: f64,
    /// Latency per request, uniformly between the two, in milliseconds.
    pub latency_ms: (u64, u64),
    /// Requests per second per API before 60007; 0 turns the limit off.
    pub rate_limit: u32,
    /// Accounts per `im_set_attr` before 90018.
    pub max_accounts: usize,
    /// Attribute names answered with 90033 whenever they appear.
    pub reject_attrs: Vec<String>,
    /// Answer every request with 90009.
    pub misconfigured: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            http_error_rate: 0.0,
            latency_ms: (0, 0),
            rate_limit: 100,
            max_accounts: 100,
            reject_attrs: Vec::new(),
            misconfigured: false,
        }
    }
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The app's SDKAppID.
    pub sdkappid: u64,
    /// The administrator account.
    pub identifier: String,
    /// The key UserSigs are verified with.
    pub secret_key: String,
    /// Attribute names registered at start (slots 0, 1, …).
    pub attr_names: Vec<String>,
    /// Seed of the fault-injection randomness.
    pub seed: u64,
    /// Initial faults.
    pub faults: Faults,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sdkappid: DEFAULT_SDKAPPID,
            identifier: "administrator".into(),
            secret_key: DEFAULT_SECRET_KEY.into(),
            attr_names: Vec::new(),
            seed: 1,
            faults: Faults::default(),
        }
    }
}

/// What the simulator has seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests by API, then by ErrorCode (HTTP 500 counted as code -500).
    pub requests: BTreeMap<String, BTreeMap<i64, u64>>,
    /// Account entries written by successful `im_set_attr` calls.
    pub accounts_written: u64,
    /// Successful `im_set_attr` calls.
    pub set_attr_ok: u64,
    /// Most accounts seen in one `im_set_attr` request.
    pub max_accounts_in_request: usize,
    /// `im_set_attr` requests holding one account twice.
    pub requests_with_duplicate_accounts: u64,
    /// Times an account was in two `im_set_attr` requests at once.
    pub overlapping_account_requests: u64,
    /// Most requests in progress at once.
    pub max_concurrent_requests: usize,
}

impl Stats {
    /// Requests to `api` answered with `code`.
    pub fn count(&self, api: &str, code: i64) -> u64 {
        self.requests
            .get(api)
            .and_then(|m| m.get(&code))
            .copied()
            .unwrap_or(0)
    }
    /// All requests to `api`.
    pub fn total(&self, api: &str) -> u64 {
        self.requests
            .get(api)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }
}

/// The attribute store: account → name → value.
pub type Store = HashMap<String, BTreeMap<String, String>>;

struct Shared {
    sdkappid: u64,
    identifier: String,
    secret_key: String,
    faults: Mutex<Faults>,
    store: Mutex<Store>,
    names: Mutex<BTreeMap<String, String>>,
    stats: Mutex<Stats>,
    rng: Mutex<StdRng>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    busy_accounts: Mutex<HashSet<String>>,
    concurrent: Mutex<usize>,
    /// When recording: (account, attributes written, when).
    applies: Mutex<Option<Vec<Applied>>>,
}

/// One account written by a successful `im_set_attr`, and when.
pub type Applied = (String, BTreeMap<String, String>, Instant);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulator.
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

/// The simulator.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Starts serving in the background.
    pub async fn start(opts: SimOptions) -> std::io::Result<SimHandle> {
        let names: BTreeMap<String, String> = opts
            .attr_names
            .iter()
            .take(10)
            .enumerate()
            .map(|(i, n)| (i.to_string(), n.clone()))
            .collect();
        let shared = Arc::new(Shared {
            sdkappid: opts.sdkappid,
            identifier: opts.identifier,
            secret_key: opts.secret_key,
            faults: Mutex::new(opts.faults),
            store: Mutex::default(),
            names: Mutex::new(names),
            stats: Mutex::default(),
            rng: Mutex::new(StdRng::seed_from_u64(opts.seed)),
            buckets: Mutex::default(),
            busy_accounts: Mutex::default(),
            concurrent: Mutex::new(0),
            applies: Mutex::new(None),
        });
        let mut handle = SimHandle {
            addr: opts.listen,
            shared,
            stop: CancellationToken::new(),
            task: None,
        };
        handle.serve().await?;
        Ok(handle)
    }
}

impl SimHandle {
    async fn serve(&mut self) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        self.stop = CancellationToken::new();
        let stop = self.stop.clone();
        let app = router(self.shared.clone());
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }));
        Ok(())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for `tencent.base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The SDKAppID it accepts.
    pub fn sdkappid(&self) -> u64 {
        self.shared.sdkappid
    }

    /// The key it verifies UserSigs with.
    pub fn secret_key(&self) -> &str {
        &self.shared.secret_key
    }

    /// A copy of the attribute store.
    pub fn state(&self) -> Store {
        lock(&self.shared.store).clone()
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// The current faults.
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Changes the faults.
    pub fn set_faults(&self, f: Faults) {
        *lock(&self.shared.faults) = f;
    }

    /// Changes some faults.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut lock(&self.shared.faults));
    }

    /// Starts (or stops) recording every account written, with the time.
    pub fn record_applies(&self, on: bool) {
        *lock(&self.shared.applies) = on.then(Vec::new);
    }

    /// Takes what was recorded so far.
    pub fn take_applies(&self) -> Vec<Applied> {
        lock(&self.shared.applies)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Stops listening (connections are refused) but keeps the state.
    pub async fn pause(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        self.serve().await
    }

    /// Stops the simulator.
    pub async fn shutdown(mut self) {
        self.pause().await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v4/all_member_push/{api}", post(handle_api))
        .route("/__simulator/stats", get(get_stats))
        .route("/__simulator/state", get(get_state))
        .with_state(shared)
}

async fn get_stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    Json(lock(&s.stats).clone())
}

async fn get_state(
    State(s): State<Arc<Shared>>,
) -> Json<BTreeMap<String, BTreeMap<String, String>>> {
    Json(
        lock(&s.store)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

const APIS: &[&str] = &[
    "im_set_attr",
    "im_get_attr",
    "im_remove_attr",
    "im_get_attr_name",
    "im_set_attr_name",
];

struct Answer {
    status: StatusCode,
    body: ApiResponse,
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

struct ConcurrencyGuard<'a>(&'a Shared);

impl Drop for ConcurrencyGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.concurrent) -= 1;
    }
}

async fn handle_api(
    State(s): State<Arc<Shared>>,
    Path(api): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if !APIS.contains(&api.as_str()) {
        return (StatusCode::NOT_FOUND, "no such API").into_response();
    }
    {
        let mut c = lock(&s.concurrent);
        *c += 1;
        let mut st = lock(&s.stats);
        st.max_concurrent_requests = st.max_concurrent_requests.max(*c);
    }
    let _guard = ConcurrencyGuard(&s);
    let answer = answer(&s, &api, query.as_deref().unwrap_or(""), &body).await;
    let code = if answer.status == StatusCode::OK {
        answer.body.error_code
    } else {
        -i64::from(answer.status.as_u16())
    };
    *lock(&s.stats)
        .requests
        .entry(api.clone())
        .or_default()
        .entry(code)
        .or_default() += 1;
    if answer.status != StatusCode::OK {
        return (answer.status, "internal server error").into_response();
    }
    Json(answer.body).into_response()
}

async fn answer(s: &Shared, api: &str, query: &str, body: &[u8]) -> Answer {
    // 1. The query string.
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for p in ["usersig", "identifier", "sdkappid", "random", "contenttype"] {
        if params.get(p).is_none_or(|v| v.is_empty()) {
            return Answer::fail(60002, format!("missing query parameter {p}"));
        }
    }
    if params["contenttype"] != "json" {
        return Answer::fail(60002, "contenttype must be json");
    }
    if params["random"].parse::<u32>().is_err() {
        return Answer::fail(60002, "random must be a 32-bit unsigned integer");
    }
    let Ok(sdkappid) = params["sdkappid"].parse::<u64>() else {
        return Answer::fail(60002, "sdkappid must be a number");
    };
    if sdkappid != s.sdkappid {
        return Answer::fail(70020, "SDKAppID not found");
    }
    // 2. The UserSig.
    match verify_usersig(
        &params["usersig"],
        &s.secret_key,
        sdkappid,
        &params["identifier"],
        unix_now(),
    ) {
        Ok(_) => {}
        Err(UserSigError::Undecodable(e)) => {
            return Answer::fail(70003, format!("usersig invalid: {e}"))
        }
        Err(UserSigError::BadSignature) => {
            return Answer::fail(70005, "usersig signature mismatch")
        }
        Err(UserSigError::Expired { .. }) => return Answer::fail(70001, "usersig expired"),
        Err(UserSigError::IdentifierMismatch { .. }) => {
            return Answer::fail(70013, "usersig identifier does not match the request")
        }
        Err(UserSigError::SdkAppIdMismatch { .. }) => {
            return Answer::fail(70014, "usersig sdkappid does not match the request")
        }
    }
    if params["identifier"] != s.identifier {
        return Answer::fail(60010, "the request requires the app administrator");
    }
    let faults = lock(&s.faults).clone();
    // 3. The frequency limit.
    if faults.rate_limit > 0 && !take_token(s, api, faults.rate_limit) {
        return Answer::fail(60007, "request frequency limit exceeded");
    }
    if faults.misconfigured {
        return Answer::fail(90009, "the request requires app admin permissions");
    }
    // 4. The body.
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Answer::fail(90001, "failed to parse the JSON body");
    };
    let set_attr_accounts = if api == "im_set_attr" {
        match parse_user_attrs(&json) {
            Ok(list) => Some(list),
            Err(a) => return a,
        }
    } else {
        None
    };
    // 5. In progress: latency and injected failures.
    let accounts: Vec<String> = set_attr_accounts
        .as_ref()
        .map(|l| l.iter().map(|u| u.to_account.clone()).collect())
        .unwrap_or_default();
    {
        let mut busy = lock(&s.busy_accounts);
        let mut st = lock(&s.stats);
        let mut seen = HashSet::new();
        let mut dup = false;
        for a in &accounts {
            if !seen.insert(a) {
                dup = true;
            } else if !busy.insert(a.clone()) {
                st.overlapping_account_requests += 1;
            }
        }
        if dup {
            st.requests_with_duplicate_accounts += 1;
        }
        st.max_accounts_in_request = st.max_accounts_in_request.max(accounts.len());
    }
    let (latency, fail, http_fail) = {
        let mut rng = lock(&s.rng);
        let (lo, hi) = faults.latency_ms;
        let latency = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        (
            latency,
            faults.fail_rate > 0.0 && rng.gen_bool(faults.fail_rate.min(1.0)),
            faults.http_error_rate > 0.0 && rng.gen_bool(faults.http_error_rate.min(1.0)),
        )
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let result = if http_fail {
        Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ApiResponse::default(),
        }
    } else if fail {
        Answer::fail(91000, "internal service error, try again")
    } else {
        match set_attr_accounts {
            Some(list) => set_attr(s, &faults, list),
            None => other_api(s, api, &json),
        }
    };
    {
        let mut busy = lock(&s.busy_accounts);
        for a in &accounts {
            busy.remove(a);
        }
    }
    result
}

fn take_token(s: &Shared, api: &str, per_sec: u32) -> bool {
    let now = Instant::now();
    let cap = f64::from(per_sec);
    let mut buckets = lock(&s.buckets);
    let (tokens, last) = buckets.entry(api.to_string()).or_insert((cap, now));
    *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * cap).min(cap);
    *last = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

#[allow(clippy::result_large_err)]
fn parse_user_attrs(json: &serde_json::Value) -> Result<Vec<UserAttrs>, Answer> {
    let Some(list) = json.get("UserAttrs").and_then(|v| v.as_array()) else {
        return Err(Answer::fail(90001, "UserAttrs must be an array"));
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let Some(to) = e.get("To_Account").and_then(|v| v.as_str()) else {
            return Err(Answer::fail(90001, "To_Account must be a string"));
        };
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

fn set_attr(s: &Shared, faults: &Faults, list: Vec<UserAttrs>) -> Answer {
    if list.len() > faults.max_accounts {
        return Answer::fail(
            90018,
            format!(
                "{} accounts, over the limit of {}",
                list.len(),
                faults.max_accounts
            ),
        );
    }
    let names: HashSet<String> = lock(&s.names).values().cloned().collect();
    for u in &list {
        if u.attrs.len() > 10 {
            return Answer::fail(90033, format!("{}: more than 10 attributes", u.to_account));
        }
        for (k, v) in &u.attrs {
            if faults.reject_attrs.contains(k) {
                return Answer::fail(90033, format!("invalid attribute: {k}"));
            }
            if !names.contains(k) {
                return Answer::fail(90033, format!("invalid attribute: {k} is not registered"));
            }
            if v.len() > 50 {
                return Answer::fail(
                    90033,
                    format!("invalid attribute: value of {k} over 50 bytes"),
                );
            }
        }
    }
    let n = list.len() as u64;
    if let Some(rec) = lock(&s.applies).as_mut() {
        let now = Instant::now();
        rec.extend(
            list.iter()
                .map(|u| (u.to_account.clone(), u.attrs.clone(), now)),
        );
    }
    {
        let mut store = lock(&s.store);
        for u in list {
            store.entry(u.to_account).or_default().extend(u.attrs);
        }
    }
    let mut st = lock(&s.stats);
    st.accounts_written += n;
    st.set_attr_ok += 1;
    Answer::ok(ApiResponse::ok())
}

fn other_api(s: &Shared, api: &str, json: &serde_json::Value) -> Answer {
    match api {
        "im_get_attr" => {
            let Some(list) = json.get("To_Account").and_then(|v| v.as_array()) else {
                return Answer::fail(90001, "To_Account must be an array");
            };
            if list.len() > 100 {
                return Answer::fail(90018, "more than 100 accounts");
            }
            let store = lock(&s.store);
            let users = list
                .iter()
                .filter_map(|a| a.as_str())
                .map(|a| UserAttrs {
                    to_account: a.to_string(),
                    attrs: store.get(a).cloned().unwrap_or_default(),
                })
                .collect();
            Answer::ok(ApiResponse {
                user_attrs: Some(users),
                ..ApiResponse::ok()
            })
        }
        "im_remove_attr" => {
            let Some(list) = json.get("UserAttrs").and_then(|v| v.as_array()) else {
                return Answer::fail(90001, "UserAttrs must be an array");
            };
            let mut store = lock(&s.store);
            for e in list {
                let (Some(a), Some(names)) = (
                    e.get("To_Account").and_then(|v| v.as_str()),
                    e.get("Attrs").and_then(|v| v.as_array()),
                ) else {
                    return Answer::fail(90001, "each entry needs To_Account and Attrs");
                };
                if let Some(m) = store.get_mut(a) {
                    for n in names.iter().filter_map(|n| n.as_str()) {
                        m.remove(n);
                    }
                }
            }
            Answer::ok(ApiResponse::ok())
        }
        "im_get_attr_name" => Answer::ok(ApiResponse {
            attr_names: Some(lock(&s.names).clone()),
            ..ApiResponse::ok()
        }),
        "im_set_attr_name" => {
            let Some(m) = json.get("AttrNames").and_then(|v| v.as_object()) else {
                return Answer::fail(90001, "AttrNames must be an object");
            };
            let mut names = lock(&s.names);
            for (slot, name) in m {
                let valid_slot = slot.parse::<u8>().is_ok_and(|n| n <= 9);
                let Some(name) = name
                    .as_str()
                    .filter(|n| valid_slot && !n.is_empty() && n.len() <= 50)
                else {
                    return Answer::fail(90033, format!("invalid attribute name slot {slot}"));
                };
                names.insert(slot.clone(), name.to_string());
            }
            Answer::ok(ApiResponse::ok())
        }
        _ => Answer::fail(60002, "unknown API"),
    }
}
