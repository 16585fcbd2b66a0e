//! A local stand-in for the Tencent Cloud Chat attribute APIs: in-memory
//! state, Tencent's own checks and codes, a frequency limit, and seeded fault
//! injection. Used by `imattr simulate`, the demo, the benchmarks and tests.

mod answer;
mod limiter;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub(crate) use limiter::Limiter;
pub use limiter::RateLimitMode;

pub use crate::config::RateLimitScope;

/// The secret key the simulator uses unless told otherwise (the documented test key).
pub const DEFAULT_SECRET_KEY: &str =
    "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
/// The SDKAppID the simulator uses unless told otherwise.
pub(crate) const DEFAULT_SDKAPPID: u64 = 1400000000;

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
    /// How `rate_limit` is measured (strict: any sliding 1-second window).
    #[serde(default)]
    pub rate_limit_mode: RateLimitMode,
    /// Whether `rate_limit` counts each API on its own or all together.
    #[serde(default = "per_api")]
    pub rate_limit_scope: RateLimitScope,
    /// Accounts per `im_set_attr` or `im_remove_attr` before 90018.
    pub max_accounts: usize,
    /// Attribute names answered with 90033 whenever they appear.
    pub reject_attrs: Vec<String>,
    /// Answer every request with 90009.
    pub misconfigured: bool,
    /// Accounts whose every `im_set_attr` or `im_remove_attr` request
    /// answers 91000, applying nothing.
    #[serde(default)]
    pub fail_accounts: Vec<String>,
    /// Accounts whose every `im_set_attr` or `im_remove_attr` request
    /// answers 90033, applying nothing.
    #[serde(default)]
    pub reject_accounts: Vec<String>,
}

fn per_api() -> RateLimitScope {
    RateLimitScope::PerApi
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            http_error_rate: 0.0,
            latency_ms: (0, 0),
            rate_limit: 100,
            rate_limit_mode: RateLimitMode::Strict,
            rate_limit_scope: RateLimitScope::PerApi,
            max_accounts: 100,
            reject_attrs: Vec::new(),
            misconfigured: false,
            fail_accounts: Vec::new(),
            reject_accounts: Vec::new(),
        }
    }
}

/// How to start a simulator (its `Debug` hides the key).
#[derive(Clone)]
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
    /// Count in `Stats::regressions` every integer value written over a larger one.
    pub monotonic_check: bool,
}

impl std::fmt::Debug for SimOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimOptions")
            .field("listen", &self.listen)
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field(
                "secret_key",
                &crate::config::Secret::new(self.secret_key.clone()),
            )
            .field("attr_names", &self.attr_names)
            .field("seed", &self.seed)
            .field("faults", &self.faults)
            .field("monotonic_check", &self.monotonic_check)
            .finish()
    }
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
            monotonic_check: true,
        }
    }
}

/// What the simulator has seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests by API, then by ErrorCode (HTTP 500 counted as code -500).
    pub(crate) requests: BTreeMap<String, BTreeMap<i64, u64>>,
    /// Account entries written by successful `im_set_attr` calls.
    pub accounts_written: u64,
    /// Successful `im_set_attr` calls.
    pub set_attr_ok: u64,
    /// Account entries of successful `im_remove_attr` calls.
    #[serde(default)]
    pub accounts_removed: u64,
    /// Successful `im_remove_attr` calls.
    #[serde(default)]
    pub remove_attr_ok: u64,
    /// Most accounts seen in one `im_set_attr` or `im_remove_attr` request.
    pub max_accounts_in_request: usize,
    /// `im_set_attr` or `im_remove_attr` requests holding one account twice.
    pub requests_with_duplicate_accounts: u64,
    /// Times an account was in two requests at once (`im_set_attr` or
    /// `im_remove_attr`, in any combination).
    pub overlapping_account_requests: u64,
    /// Most requests in progress at once.
    pub max_concurrent_requests: usize,
    /// Accepted writes of an integer value smaller than the stored integer
    /// for the same (account, attribute), when the monotonic check is on.
    #[serde(default)]
    pub regressions: u64,
    /// Requests whose client went away before they were answered (it timed
    /// out or closed the connection): nothing of them was applied.
    #[serde(default)]
    pub abandoned_requests: u64,
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
pub(crate) type Store = HashMap<String, BTreeMap<String, String>>;

/// Everything that changes while the simulator runs, behind one lock.
struct SimState {
    faults: Faults,
    store: Store,
    /// Slot ("0"…"9") → attribute name.
    names: BTreeMap<String, String>,
    stats: Stats,
    rng: StdRng,
    limiters: HashMap<String, Limiter>,
    /// Account → requests holding it now.
    busy_accounts: HashMap<String, usize>,
    concurrent: usize,
    /// When recording: every account written, with the time.
    applies: Option<Vec<Applied>>,
    /// Every API request is refused with 60007 until then.
    refuse_until: Option<tokio::time::Instant>,
}

struct Shared {
    sdkappid: u64,
    identifier: String,
    secret_key: String,
    monotonic_check: bool,
    state: Mutex<SimState>,
}

impl Shared {
    fn new(opts: SimOptions) -> Self {
        let names = opts
            .attr_names
            .iter()
            .take(10)
            .enumerate()
            .map(|(i, n)| (i.to_string(), n.clone()))
            .collect();
        Shared {
            sdkappid: opts.sdkappid,
            identifier: opts.identifier,
            secret_key: opts.secret_key,
            monotonic_check: opts.monotonic_check,
            state: Mutex::new(SimState {
                faults: opts.faults,
                store: Store::new(),
                names,
                stats: Stats::default(),
                rng: StdRng::seed_from_u64(opts.seed),
                limiters: HashMap::new(),
                busy_accounts: HashMap::new(),
                concurrent: 0,
                applies: None,
                refuse_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic elsewhere leaves the state usable: every update is complete.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One account written by a successful `im_set_attr`, and when.
pub(crate) type Applied = (String, BTreeMap<String, String>, Instant);

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
        let listen = opts.listen;
        let shared = Arc::new(Shared::new(opts));
        let mut handle = SimHandle {
            addr: listen,
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
        self.shared.lock().store.clone()
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Requests being answered now (arrived, not yet answered).
    pub fn in_progress(&self) -> usize {
        self.shared.lock().concurrent
    }

    /// Changes the faults.
    pub fn set_faults(&self, f: Faults) {
        self.shared.lock().faults = f;
    }

    /// Changes some faults.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.lock().faults);
    }

    /// Starts (or stops) recording every account written, with the time.
    pub(crate) fn record_applies(&self, on: bool) {
        self.shared.lock().applies = on.then(Vec::new);
    }

    /// Takes what was recorded so far.
    pub(crate) fn take_applies(&self) -> Vec<Applied> {
        self.shared
            .lock()
            .applies
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

    pub(crate) async fn shutdown(mut self) {
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
        .route("/__simulator/refuse", post(post_refuse))
        .route("/__simulator/faults", get(get_faults).post(post_faults))
        .with_state(shared)
}

#[derive(Deserialize)]
struct RefuseParams {
    ms: u64,
}

/// `POST /__simulator/refuse?ms=N`: refuse every API request for N ms.
async fn post_refuse(
    AxumState(s): AxumState<Arc<Shared>>,
    axum::extract::Query(p): axum::extract::Query<RefuseParams>,
) -> StatusCode {
    s.lock().refuse_until =
        Some(tokio::time::Instant::now() + std::time::Duration::from_millis(p.ms));
    StatusCode::NO_CONTENT
}

/// `GET /__simulator/faults`: the faults in force, as `imattr simulate` took them.
async fn get_faults(AxumState(s): AxumState<Arc<Shared>>) -> Json<Faults> {
    Json(s.lock().faults.clone())
}

/// `POST /__simulator/faults` with a whole `Faults` document: changes them.
async fn post_faults(AxumState(s): AxumState<Arc<Shared>>, Json(f): Json<Faults>) -> StatusCode {
    s.lock().faults = f;
    StatusCode::NO_CONTENT
}

async fn get_stats(AxumState(s): AxumState<Arc<Shared>>) -> Json<Stats> {
    Json(s.lock().stats.clone())
}

async fn get_state(
    AxumState(s): AxumState<Arc<Shared>>,
) -> Json<BTreeMap<String, BTreeMap<String, String>>> {
    Json(
        s.lock()
            .store
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

/// Counts a request in progress for as long as it lives, whether it
/// completes or its connection goes away mid-way (then it was abandoned).
struct InProgress<'a> {
    s: &'a Shared,
    answered: bool,
}

impl<'a> InProgress<'a> {
    fn start(s: &'a Shared) -> Self {
        let mut st = s.lock();
        st.concurrent += 1;
        st.stats.max_concurrent_requests = st.stats.max_concurrent_requests.max(st.concurrent);
        InProgress { s, answered: false }
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut st = self.s.lock();
        st.concurrent -= 1;
        if !self.answered {
            st.stats.abandoned_requests += 1;
        }
    }
}

async fn handle_api(
    AxumState(s): AxumState<Arc<Shared>>,
    Path(api): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if !APIS.contains(&api.as_str()) {
        return (StatusCode::NOT_FOUND, "no such API").into_response();
    }
    let mut in_progress = InProgress::start(&s);
    let answer = answer::answer(&s, &api, query.as_deref().unwrap_or(""), &body).await;
    in_progress.answered = true;
    let code = if answer.status == StatusCode::OK {
        answer.body.error_code
    } else {
        -i64::from(answer.status.as_u16())
    };
    *s.lock()
        .stats
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tencent::usersig::{gen_usersig_at, unix_now};

    fn shared(faults: Faults) -> Shared {
        Shared::new(SimOptions {
            attr_names: vec!["k".into()],
            faults,
            ..SimOptions::default()
        })
    }

    fn query() -> String {
        let sig = gen_usersig_at(
            DEFAULT_SECRET_KEY,
            DEFAULT_SDKAPPID,
            "administrator",
            unix_now(),
            3600,
        );
        format!("usersig={sig}&identifier=administrator&sdkappid={DEFAULT_SDKAPPID}&random=7&contenttype=json")
    }

    async fn set(s: &Shared, account: &str, value: &str) -> i64 {
        let body =
            format!(r#"{{"UserAttrs":[{{"To_Account":"{account}","Attrs":{{"k":"{value}"}}}}]}}"#);
        answer::answer(s, "im_set_attr", &query(), body.as_bytes())
            .await
            .body
            .error_code
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_during_its_latency_leaves_no_account_busy() {
        let s = shared(Faults {
            latency_ms: (1000, 1000),
            ..Faults::default()
        });
        let abandoned = tokio::time::timeout(Duration::from_millis(10), set(&s, "a", "1")).await;
        assert!(abandoned.is_err(), "still in its latency");
        assert!(s.lock().busy_accounts.is_empty());
        assert_eq!(set(&s, "a", "2").await, 0);
        let st = s.lock();
        assert_eq!(st.stats.overlapping_account_requests, 0);
        assert!(st.busy_accounts.is_empty());
        assert_eq!(
            st.store["a"]["k"], "2",
            "the abandoned request wrote nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_in_two_requests_at_once_is_counted_once_per_overlap() {
        let s = shared(Faults {
            latency_ms: (100, 100),
            ..Faults::default()
        });
        let (a, b) = tokio::join!(set(&s, "a", "1"), set(&s, "a", "2"));
        assert_eq!((a, b), (0, 0));
        assert_eq!(set(&s, "a", "3").await, 0);
        let st = s.lock();
        assert_eq!(st.stats.overlapping_account_requests, 1);
        assert!(st.busy_accounts.is_empty());
    }

    #[tokio::test]
    async fn regressions_count_integer_values_going_backwards() {
        let s = shared(Faults::default());
        for (v, regressions) in [
            ("5", 0),
            ("7", 0),
            ("3", 1),
            ("3", 1),
            ("x", 1),
            ("2", 1),
            ("-1", 2),
        ] {
            assert_eq!(set(&s, "a", v).await, 0);
            assert_eq!(s.lock().stats.regressions, regressions, "after {v}");
        }
        // Another account has its own history.
        assert_eq!(set(&s, "b", "0").await, 0);
        assert_eq!(s.lock().stats.regressions, 2);
        let off = Shared::new(SimOptions {
            attr_names: vec!["k".into()],
            monotonic_check: false,
            ..SimOptions::default()
        });
        set(&off, "a", "5").await;
        set(&off, "a", "1").await;
        assert_eq!(off.lock().stats.regressions, 0);
    }

    #[tokio::test]
    async fn a_failing_account_fails_every_request_holding_it_and_applies_nothing() {
        let s = shared(Faults {
            fail_accounts: vec!["bad".into()],
            ..Faults::default()
        });
        let both = br#"{"UserAttrs":[{"To_Account":"ok","Attrs":{"k":"1"}},{"To_Account":"bad","Attrs":{"k":"1"}}]}"#;
        for _ in 0..3 {
            let a = answer::answer(&s, "im_set_attr", &query(), both).await;
            assert_eq!(a.body.error_code, 91000);
        }
        assert!(s.lock().store.is_empty());
        assert_eq!(set(&s, "ok", "1").await, 0);
        s.lock().faults.fail_accounts.clear();
        assert_eq!(set(&s, "bad", "1").await, 0);
        assert_eq!(s.lock().store.len(), 2);
    }

    async fn call(s: &Shared, api: &str, body: &str) -> i64 {
        answer::answer(s, api, &query(), body.as_bytes())
            .await
            .body
            .error_code
    }

    #[tokio::test]
    async fn remove_attr_is_as_strict_as_set_attr() {
        let s = shared(Faults {
            max_accounts: 2,
            reject_accounts: vec!["refused".into()],
            ..Faults::default()
        });
        assert_eq!(set(&s, "a", "1").await, 0);
        assert_eq!(set(&s, "b", "1").await, 0);
        let rm = "im_remove_attr";
        // Names must be registered, entries well formed, accounts within the limit.
        assert_eq!(
            call(
                &s,
                rm,
                r#"{"UserAttrs":[{"To_Account":"a","Attrs":["nope"]}]}"#
            )
            .await,
            90033
        );
        assert_eq!(
            call(&s, rm, r#"{"UserAttrs":[{"To_Account":"a","Attrs":[1]}]}"#).await,
            90033
        );
        assert_eq!(
            call(
                &s,
                rm,
                r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"k":"v"}}]}"#
            )
            .await,
            90001
        );
        assert_eq!(call(&s, rm, r#"{"To_Account":"a"}"#).await, 90001);
        let three = r#"{"UserAttrs":[{"To_Account":"a","Attrs":["k"]},{"To_Account":"b","Attrs":["k"]},{"To_Account":"c","Attrs":["k"]}]}"#;
        assert_eq!(call(&s, rm, three).await, 90018);
        let with_refused = r#"{"UserAttrs":[{"To_Account":"a","Attrs":["k"]},{"To_Account":"refused","Attrs":["k"]}]}"#;
        assert_eq!(call(&s, rm, with_refused).await, 90033);
        assert_eq!(
            s.lock().store.len(),
            2,
            "nothing removed by a refused request"
        );
        // Accepted: a removed, b kept; removing what is absent is fine.
        let ok =
            r#"{"UserAttrs":[{"To_Account":"a","Attrs":["k"]},{"To_Account":"zz","Attrs":["k"]}]}"#;
        assert_eq!(call(&s, rm, ok).await, 0);
        {
            let st = s.lock();
            assert!(!st.store.contains_key("a"));
            assert_eq!(st.store["b"]["k"], "1");
            assert_eq!((st.stats.remove_attr_ok, st.stats.accounts_removed), (1, 2));
        }
        // The same refusal for sets.
        let set_refused = r#"{"UserAttrs":[{"To_Account":"refused","Attrs":{"k":"1"}}]}"#;
        assert_eq!(call(&s, "im_set_attr", set_refused).await, 90033);
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_scope_counts_both_apis_on_one_budget() {
        for (scope, refused) in [(RateLimitScope::PerApi, 0), (RateLimitScope::Shared, 2)] {
            let s = shared(Faults {
                rate_limit: 2,
                rate_limit_scope: scope,
                ..Faults::default()
            });
            let rm = r#"{"UserAttrs":[{"To_Account":"a","Attrs":["k"]}]}"#;
            let codes = [
                set(&s, "a", "1").await,
                set(&s, "a", "2").await,
                call(&s, "im_remove_attr", rm).await,
                call(&s, "im_remove_attr", rm).await,
            ];
            let n = codes.iter().filter(|c| **c == 60007).count();
            assert_eq!(n, refused, "{scope}: {codes:?}");
        }
    }
}
