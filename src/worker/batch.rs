//! One batch run to its end, in its own task: send the request, retry it,
//! split it, bisect it, until every (delivery, account) has an outcome or
//! the session stops.
//!
//! What to do with each answer is decided by [`next_step`], a pure function
//! of the answer's class and where the request stands; this module only
//! carries its steps out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::session::Event;
use crate::amqp::deadletter::{Failure, Reason};
use crate::coalesce::{BatchCap, Entry, Tag};
use crate::config::{RetryConfig, API_BACKEND_TIMEOUT_MS};
use crate::fence::Fence;
use crate::retry::TransientBudget;
use crate::tencent::client::{api, remove_attr_body, set_attr_body};
use crate::tencent::door::Ticket;
use crate::tencent::{Class, Client, Reply};
use crate::wait::{backoff_forever, sleep_unless_cancelled};

/// How long the API's backend may go on processing a request after its
/// front end gave up on it (docs/ and `config::API_BACKEND_TIMEOUT_MS`).
const BACKEND_TIMEOUT: Duration = Duration::from_millis(API_BACKEND_TIMEOUT_MS);

/// Whether the API may still apply a request after this answer: anything
/// but a parsed HTTP 200 body (a timeout, a broken connection, a gateway
/// status, a garbled body) leaves the request possibly in flight.
pub(super) fn ambiguous(reply: &Reply) -> bool {
    !matches!(reply, Reply::Body { .. })
}

/// What every batch task of a session shares.
pub(super) struct BatchCtx {
    pub(super) client: Client,
    pub(super) retry: RetryConfig,
    pub(super) cap: Arc<BatchCap>,
    /// The session's fence: closed when the session is lost or ends (retries
    /// and probes stop at once), shut for a while when its lease lapsed;
    /// every request checks it right before it leaves.
    pub(super) fence: Fence,
    pub(super) events: mpsc::UnboundedSender<Event>,
}

/// One (delivery, account) result from a batch.
#[derive(Debug)]
pub(super) struct PartOutcome {
    pub(super) tag: Tag,
    pub(super) result: Result<(), Failure>,
}

/// Where one request stands when an answer comes back: what, besides the
/// answer's class, the next step depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attempt {
    /// Accounts in the request.
    pub(super) accounts: usize,
    /// Messages merged into its first account (what matters when it is the only one).
    pub(super) parts: usize,
    /// The UserSig was already renewed for this request.
    pub(super) renewed: bool,
    /// A fresh UserSig can be made (a secret key, not a fixed usersig).
    pub(super) can_renew: bool,
    /// A misconfigured answer paused consuming and this request is probing.
    pub(super) paused: bool,
}

/// The waits a request may need. In production the `backoff` crate's
/// policies; in tests fixed values. Each call moves its policy on.
pub(super) trait Waits {
    /// The wait before retrying a transient failure; None once
    /// `retry.max_elapsed_secs` is spent.
    fn transient(&mut self) -> Option<Duration>;
    /// The wait after a rate-limited answer (never gives up).
    fn rate_limited(&mut self) -> Duration;
    /// The wait between probes while paused (never gives up, at most 60 s).
    fn probe(&mut self) -> Duration;
    /// A pause ended: the next pause probes from its first wait again.
    fn resumed(&mut self) {}
}

impl Attempt {
    /// Takes note of an answer before [`next_step`] decides on it: any
    /// answer but a misconfigured, signature or rate-limited one ends a
    /// pause (the API is past its configuration check), so transient
    /// failures go back to the retry policy. True when it ended one.
    pub(super) fn answered(&mut self, class: Class) -> bool {
        let ends_pause = self.paused
            && !matches!(
                class,
                Class::Signature | Class::Misconfigured | Class::RateLimited
            );
        if ends_pause {
            self.paused = false;
        }
        ends_pause
    }
}

/// What to do after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Send the same request again.
    Again(Again),
    /// This request is done with; what becomes of its entries.
    Verdict(Verdict),
}

/// How to send the same request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Again {
    /// After a transient failure, within the retry budget.
    Retry(Duration),
    /// After a rate-limited answer (the client lowers its rate itself).
    SlowDown(Duration),
    /// First misconfigured answer: pause consuming, then probe after the wait.
    Pause(Duration),
    /// Still paused: probe again after the wait.
    Probe(Duration),
    /// At once, with a freshly generated UserSig.
    RenewSignature,
}

/// How a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Every entry applied.
    Applied,
    /// Too many accounts (90018): send each half, and lower the batch size.
    Split,
    /// Rejected with several accounts: send each half to isolate the bad ones.
    Bisect,
    /// Rejected with one account merged from several messages: send each
    /// message alone, in order, to isolate the bad ones.
    Isolate,
    /// Dead-letter every message of the request.
    DeadLetter(Reason),
}

/// The answer-class → step table (docs/messages.md), with no I/O.
pub(super) fn next_step(class: Class, at: Attempt, waits: &mut impl Waits) -> Step {
    use {Again::*, Verdict::*};
    match class {
        Class::Success => Step::Verdict(Applied),
        Class::Transient | Class::Unknown => match waits.transient() {
            Some(d) => Step::Again(Retry(d)),
            None => Step::Verdict(DeadLetter(Reason::RetriesExhausted)),
        },
        Class::RateLimited => Step::Again(SlowDown(waits.rate_limited())),
        Class::Signature if !at.renewed && at.can_renew => Step::Again(RenewSignature),
        Class::TooManyAccounts if at.accounts > 1 => Step::Verdict(Split),
        Class::TooManyAccounts | Class::Rejected if at.accounts > 1 => Step::Verdict(Bisect),
        Class::TooManyAccounts | Class::Rejected if at.parts > 1 => Step::Verdict(Isolate),
        Class::TooManyAccounts | Class::Rejected => Step::Verdict(DeadLetter(Reason::Rejected)),
        Class::Signature | Class::Misconfigured if at.paused => Step::Again(Probe(waits.probe())),
        Class::Signature | Class::Misconfigured => Step::Again(Pause(waits.probe())),
    }
}

/// The production waits: retries per `retry.*`, the rate-limit and probe
/// backoffs never giving up.
struct Backoffs {
    retry: ExponentialBackoff,
    /// Only time in transient failure counts toward `retry.max_elapsed_secs`.
    budget: TransientBudget,
    rate: ExponentialBackoff,
    probe: ExponentialBackoff,
}

/// The longest wait between probes, jitter included.
const PROBE_MAX: Duration = Duration::from_secs(60);

impl Backoffs {
    fn new(retry: &RetryConfig) -> Self {
        let mut intervals = retry.backoff();
        // The budget below decides when to give up, not the crate's clock
        // (which would count rate-limited and paused time too).
        intervals.max_elapsed_time = None;
        Backoffs {
            retry: intervals,
            budget: TransientBudget::from_secs(retry.max_elapsed_secs),
            rate: backoff_forever(Duration::from_millis(200), Duration::from_secs(10)),
            probe: backoff_forever(Duration::from_secs(1), PROBE_MAX),
        }
    }
}

impl Waits for Backoffs {
    fn transient(&mut self) -> Option<Duration> {
        self.budget.answer(Instant::now(), true);
        let wait = self.retry.next_backoff()?;
        (!self.budget.exhausted_after(wait)).then_some(wait)
    }
    fn rate_limited(&mut self) -> Duration {
        self.budget.answer(Instant::now(), false);
        self.rate.next_backoff().unwrap_or(Duration::from_secs(60))
    }
    fn probe(&mut self) -> Duration {
        self.budget.answer(Instant::now(), false);
        // The crate's jitter applies on top of its cap: cap the result.
        self.probe
            .next_backoff()
            .unwrap_or(PROBE_MAX)
            .min(PROBE_MAX)
    }
    fn resumed(&mut self) {
        self.probe.reset();
    }
}

/// Which write API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `im_set_attr`: the attributes whose last operation is a value.
    Set,
    /// `im_remove_attr`: the attributes whose last operation is a removal.
    Remove,
}

impl Kind {
    fn api(self) -> &'static str {
        match self {
            Kind::Set => api::SET_ATTR,
            Kind::Remove => api::REMOVE_ATTR,
        }
    }

    /// Whether an entry has anything for this API.
    fn touches(self, e: &Entry) -> bool {
        match self {
            Kind::Set => !e.sets().is_empty(),
            Kind::Remove => !e.removes().is_empty(),
        }
    }

    /// The request body for these entries (each has something for this API).
    fn body(self, entries: &[Entry]) -> Vec<u8> {
        match self {
            Kind::Set => {
                let sets: Vec<(&str, Vec<(&str, &str)>)> = entries
                    .iter()
                    .map(|e| (e.account.as_str(), e.sets()))
                    .collect();
                set_attr_body(&sets)
            }
            Kind::Remove => {
                let removes: Vec<(&str, Vec<&str>)> = entries
                    .iter()
                    .map(|e| (e.account.as_str(), e.removes()))
                    .collect();
                remove_attr_body(&removes)
            }
        }
    }
}

/// One request still to send.
struct Unit {
    kind: Kind,
    entries: Vec<Entry>,
    /// Attempts already spent on these entries.
    prior: u32,
    /// One message of one account resent on its own (isolating a rejected
    /// one): its own operations, sent whatever became of the account's
    /// merged request.
    alone: bool,
}

/// The outcome of every (delivery, account) of a batch, each reported once:
/// a failure in either API's request wins over a success in the other.
#[derive(Default)]
struct Outcomes {
    order: Vec<(Tag, String)>,
    results: HashMap<(Tag, String), Result<(), Failure>>,
}

impl Outcomes {
    fn applied(&mut self, entries: &[Entry]) {
        for e in entries {
            for p in &e.parts {
                self.record(p.tag, &e.account, Ok(()));
            }
        }
    }

    fn record(&mut self, tag: Tag, account: &str, r: Result<(), Failure>) {
        match self.results.get_mut(&(tag, account.to_string())) {
            None => {
                self.order.push((tag, account.to_string()));
                self.results.insert((tag, account.to_string()), r);
            }
            Some(old @ Ok(())) => *old = r,
            // The first failure stays (what the dead letter reports).
            Some(Err(_)) => {}
        }
    }

    fn failed(&self, tag: Tag, account: &str) -> bool {
        matches!(self.results.get(&(tag, account.to_string())), Some(Err(_)))
    }

    /// The outcomes, leaving out those of `unfinished` (parts with a
    /// request still to send: reporting them would ack a message before all
    /// of it was applied).
    fn into_vec(mut self, unfinished: &HashSet<(Tag, String)>) -> Vec<PartOutcome> {
        self.order
            .into_iter()
            .filter(|k| !unfinished.contains(k))
            .filter_map(|k| {
                let result = self.results.remove(&k)?;
                Some(PartOutcome { tag: k.0, result })
            })
            .collect()
    }
}

/// Runs one batch to the end: every part applied or failed, unless the
/// session stops first (then the parts without outcome stay unacked).
/// `ticket`: the first request's place at the door, taken when the batch
/// was formed (None: take one now).
///
/// Each account's operations leave as at most one `im_set_attr` entry and
/// one `im_remove_attr` entry, never at the same time: the batch sends its
/// `im_set_attr` request, then its `im_remove_attr` request (they touch
/// different attributes, so either order gives the same state), and the
/// accounts stay locked until both are settled (docs/design.md).
pub(super) async fn execute_batch(
    entries: Vec<Entry>,
    ctx: &BatchCtx,
    ticket: Option<Ticket>,
) -> Vec<PartOutcome> {
    let mut outcomes = Outcomes::default();
    let mut ticket = ticket;
    // One merge per entry to sort it (its request body merges once more);
    // only an entry with both values and removals is copied.
    let mut sets: Vec<Entry> = Vec::with_capacity(entries.len());
    let mut removes: Vec<Entry> = Vec::new();
    let mut removes_only: Vec<Entry> = Vec::new();
    for e in entries {
        let (has_set, has_remove) = {
            let merged = e.merged();
            (
                merged.iter().any(|(_, v)| v.is_some()),
                merged.iter().any(|(_, v)| v.is_none()),
            )
        };
        match (has_set, has_remove) {
            (true, true) => {
                removes.push(e.clone());
                sets.push(e);
            }
            (true, false) => sets.push(e),
            (false, _) => removes_only.push(e),
        }
    }
    removes.extend(removes_only);
    let unit = |kind: Kind, entries: Vec<Entry>| Unit {
        kind,
        entries,
        prior: 0,
        alone: false,
    };
    let mut work: VecDeque<Unit> =
        VecDeque::from([unit(Kind::Set, sets), unit(Kind::Remove, removes)]);
    // Accounts whose messages are being resent one by one, and accounts
    // whose merged request was dead-lettered: their other merged request
    // is not sent (the resending covers it, or the messages are dead).
    let mut done_with: HashSet<String> = HashSet::new();
    // When the last request with an ambiguous answer was sent.
    let mut last_ambiguous: Option<Instant> = None;
    let mut stopped = None;
    while let Some(mut u) = work.pop_front() {
        if u.alone {
            // A message resent alone already failed in its other request.
            u.entries
                .retain(|e| e.parts.iter().all(|p| !outcomes.failed(p.tag, &e.account)));
        } else {
            u.entries.retain(|e| !done_with.contains(&e.account));
        }
        if u.entries.is_empty() {
            continue;
        }
        if u.alone || u.kind == Kind::Remove {
            // A message resent alone may set what a merged request with an
            // ambiguous answer also wrote, and an account's im_remove_attr
            // may follow its im_set_attr whose first attempt had one: that
            // request must be past applying (one account, one request).
            if let Some(sent_at) = last_ambiguous {
                if !settled_after(sent_at, ctx.fence.token()).await {
                    stopped = Some(u);
                    break;
                }
            }
        }
        let Some(sent) = send(u.kind, &u.entries, ctx, ticket.take(), &mut last_ambiguous).await
        else {
            stopped = Some(u);
            break;
        };
        let attempts = u.prior + sent.attempts;
        match sent.verdict {
            Verdict::Applied => outcomes.applied(&u.entries),
            Verdict::Split | Verdict::Bisect => {
                if sent.verdict == Verdict::Split {
                    ctx.cap.lower(u.entries.len());
                    warn!(api = u.kind.api(), accounts = u.entries.len(), "Too many accounts for the API (90018); splitting and lowering the batch size for a while");
                }
                let (a, b) = split_half(u.entries);
                for half in [b, a] {
                    work.push_front(Unit {
                        kind: u.kind,
                        entries: half,
                        prior: attempts,
                        alone: u.alone,
                    });
                }
            }
            Verdict::Isolate => {
                // Every message of the account again, in order, each its
                // sets then its removals: whatever of the account was
                // applied already, the last operation applied per
                // attribute is then the last one of a message not refused.
                // Refused in the removal phase, the account's merged
                // im_set_attr was applied: its values are the newest, so
                // only the attributes whose last operation is a removal are
                // replayed (older values resent would land over newer ones).
                let replay_removed_only = u.kind == Kind::Remove;
                for e in u.entries {
                    done_with.insert(e.account.clone());
                    let removed: HashSet<String> = if replay_removed_only {
                        e.removes().into_iter().map(str::to_string).collect()
                    } else {
                        HashSet::new()
                    };
                    for mut p in e.parts.into_iter().rev() {
                        if replay_removed_only {
                            p.attrs.retain(|(name, _)| removed.contains(name));
                        }
                        let one = Entry::from_parts(e.account.clone(), vec![p]);
                        for kind in [Kind::Remove, Kind::Set] {
                            if kind.touches(&one) {
                                work.push_front(Unit {
                                    kind,
                                    entries: vec![one.clone()],
                                    prior: attempts,
                                    alone: true,
                                });
                            }
                        }
                    }
                }
            }
            Verdict::DeadLetter(reason) => {
                if reason == Reason::RetriesExhausted {
                    warn!(
                        api = u.kind.api(),
                        accounts = u.entries.len(),
                        attempts,
                        error = %sent.reply.info(),
                        "Retries exhausted; dead-lettering the batch's messages"
                    );
                }
                if !u.alone {
                    done_with.extend(u.entries.iter().map(|e| e.account.clone()));
                }
                fail_all(&mut outcomes, &u.entries, reason, &sent.reply, attempts);
            }
        }
    }
    let unfinished: HashSet<(Tag, String)> = stopped
        .iter()
        .chain(work.iter())
        .flat_map(|u| &u.entries)
        .flat_map(|e| e.parts.iter().map(|p| (p.tag, e.account.clone())))
        .collect();
    // An ambiguous request may still be applied late, over a newer value
    // sent once the accounts are unlocked: report only after the backend
    // gave up on it. Stopped meanwhile: nothing is reported (all redelivered).
    if let Some(sent_at) = last_ambiguous {
        if !settled_after(sent_at, ctx.fence.token()).await {
            return Vec::new();
        }
    }
    outcomes.into_vec(&unfinished)
}

/// Waits until the API's backend is done with a request sent at `sent_at`;
/// false if `stop` fires first.
async fn settled_after(sent_at: Instant, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(sent_at + BACKEND_TIMEOUT) => true,
        _ = stop.cancelled() => false,
    }
}

fn split_half(mut entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>) {
    let b = entries.split_off(entries.len() / 2);
    (entries, b)
}

fn fail_all(out: &mut Outcomes, entries: &[Entry], reason: Reason, reply: &Reply, attempts: u32) {
    for e in entries {
        for p in &e.parts {
            out.record(
                p.tag,
                &e.account,
                Err(Failure {
                    reason,
                    code: reply.code(),
                    error: reply.info(),
                    account: Some(e.account.clone()),
                    attempts,
                }),
            );
        }
    }
}

/// How one request ended.
struct Sent {
    verdict: Verdict,
    /// The last answer (what a dead letter reports).
    reply: Reply,
    attempts: u32,
}

/// Sends one request until [`next_step`] gives a verdict; None when the
/// session stopped first. Reports [`Event::Paused`] on the first
/// misconfigured answer and [`Event::Resumed`] when it ends after one.
/// Notes in `last_ambiguous` when a request with an ambiguous answer was sent.
async fn send(
    kind: Kind,
    entries: &[Entry],
    ctx: &BatchCtx,
    mut ticket: Option<Ticket>,
    last_ambiguous: &mut Option<Instant>,
) -> Option<Sent> {
    let body = kind.body(entries);
    let messages: usize = entries.iter().map(|e| e.parts.len()).sum();
    let mut waits = Backoffs::new(&ctx.retry);
    let mut at = Attempt {
        accounts: entries.len(),
        parts: entries.first().map_or(0, |e| e.parts.len()),
        renewed: false,
        can_renew: ctx.client.signer().is_renewable(),
        paused: false,
    };
    let mut attempts = 0u32;
    let result = loop {
        if ctx.fence.is_closed() {
            break None;
        }
        attempts += 1;
        // The first attempt uses the place taken when the batch was formed;
        // every other one queues up now.
        let ticket = ticket.take().unwrap_or_else(|| ctx.client.door().ticket());
        let Some(r) = ctx
            .client
            .call_fenced(kind.api(), body.clone(), ticket, &ctx.fence)
            .await
        else {
            break None;
        };
        if ambiguous(&r.reply) {
            // `latency` runs from the moment the request went out.
            *last_ambiguous = Some(Instant::now() - r.latency);
        }
        let code = r.reply.code();
        metrics::counter!("imattr_api_requests_total", "class" => r.class.as_str(), "code" => code.to_string()).increment(1);
        metrics::histogram!("imattr_api_request_duration_seconds").record(r.latency.as_secs_f64());
        metrics::histogram!("imattr_request_accounts").record(entries.len() as f64);
        debug!(
            api = kind.api(),
            accounts = entries.len(),
            messages,
            attempt = attempts,
            class = %r.class,
            code,
            latency_ms = r.latency.as_millis() as u64,
            "Batch request"
        );
        if at.answered(r.class) {
            waits.resumed();
            let _ = ctx.events.send(Event::Resumed);
        }
        let wait = match next_step(r.class, at, &mut waits) {
            Step::Verdict(verdict) => {
                break Some(Sent {
                    verdict,
                    reply: r.reply,
                    attempts,
                })
            }
            Step::Again(Again::RenewSignature) => {
                ctx.client.signer().invalidate();
                at.renewed = true;
                metrics::counter!("imattr_usersig_renewals_total").increment(1);
                info!(code, "UserSig refused; renewing it and retrying at once");
                continue;
            }
            Step::Again(Again::Retry(d)) => {
                metrics::counter!("imattr_retries_total").increment(1);
                d
            }
            Step::Again(Again::Pause(d)) => {
                at.paused = true;
                let _ = ctx.events.send(Event::Paused {
                    code,
                    info: r.reply.info(),
                });
                d
            }
            Step::Again(Again::SlowDown(d) | Again::Probe(d)) => d,
        };
        if !sleep_unless_cancelled(wait, ctx.fence.token()).await {
            break None;
        }
    };
    if at.paused {
        let _ = ctx.events.send(Event::Resumed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalesce::Part;
    use crate::config::Secret;
    use crate::simulator::{Faults, SimHandle, SimOptions, Simulator};
    use crate::tencent::Signer;

    /// Fixed waits; `retry_left` false: the retry budget is spent.
    struct Fixed {
        retry_left: bool,
    }

    const RETRY: Duration = Duration::from_millis(1);
    const RATE: Duration = Duration::from_millis(2);
    const PROBE: Duration = Duration::from_millis(3);

    impl Waits for Fixed {
        fn transient(&mut self) -> Option<Duration> {
            self.retry_left.then_some(RETRY)
        }
        fn rate_limited(&mut self) -> Duration {
            RATE
        }
        fn probe(&mut self) -> Duration {
            PROBE
        }
    }

    #[test]
    fn every_class_and_attempt_state() {
        use Again::*;
        use Class as C;
        use Verdict::*;
        let base = Attempt {
            accounts: 3,
            parts: 1,
            renewed: false,
            can_renew: true,
            paused: false,
        };
        let one = Attempt {
            accounts: 1,
            ..base
        };
        let merged = Attempt { parts: 2, ..one };
        let paused = Attempt {
            paused: true,
            ..base
        };
        let renewed = Attempt {
            renewed: true,
            ..base
        };
        let fixed_sig = Attempt {
            can_renew: false,
            ..base
        };
        let dl = |r| Step::Verdict(DeadLetter(r));
        #[rustfmt::skip]
        let table: &[(Class, Attempt, bool, Step)] = &[
            // class, attempt, retry budget left, step
            (C::Success, base, true, Step::Verdict(Applied)),
            (C::Success, paused, true, Step::Verdict(Applied)),
            (C::Transient, base, true, Step::Again(Retry(RETRY))),
            (C::Transient, base, false, dl(Reason::RetriesExhausted)),
            (C::Transient, paused, true, Step::Again(Retry(RETRY))),
            (C::Transient, paused, false, dl(Reason::RetriesExhausted)),
            (C::Unknown, one, true, Step::Again(Retry(RETRY))),
            (C::Unknown, one, false, dl(Reason::RetriesExhausted)),
            (C::Unknown, paused, true, Step::Again(Retry(RETRY))),
            (C::RateLimited, base, false, Step::Again(SlowDown(RATE))),
            (C::RateLimited, paused, true, Step::Again(SlowDown(RATE))),
            (C::Signature, base, true, Step::Again(RenewSignature)),
            (C::Signature, renewed, true, Step::Again(Pause(PROBE))),
            (C::Signature, fixed_sig, true, Step::Again(Pause(PROBE))),
            (C::Signature, Attempt { paused: true, ..renewed }, true, Step::Again(Probe(PROBE))),
            (C::Misconfigured, base, true, Step::Again(Pause(PROBE))),
            (C::Misconfigured, base, false, Step::Again(Pause(PROBE))),
            (C::Misconfigured, paused, true, Step::Again(Probe(PROBE))),
            (C::TooManyAccounts, base, true, Step::Verdict(Split)),
            (C::TooManyAccounts, merged, true, Step::Verdict(Isolate)),
            (C::TooManyAccounts, one, true, dl(Reason::Rejected)),
            (C::Rejected, base, true, Step::Verdict(Bisect)),
            (C::Rejected, Attempt { parts: 5, ..base }, true, Step::Verdict(Bisect)),
            (C::Rejected, merged, true, Step::Verdict(Isolate)),
            (C::Rejected, one, true, dl(Reason::Rejected)),
            (C::Rejected, one, false, dl(Reason::Rejected)),
        ];
        for (class, at, retry_left, want) in table {
            let mut w = Fixed {
                retry_left: *retry_left,
            };
            assert_eq!(next_step(*class, *at, &mut w), *want, "{class} {at:?}");
        }
    }

    /// Which answers end a pause: everything but the misconfigured,
    /// signature and rate-limited ones.
    #[test]
    fn answers_that_end_a_pause() {
        use Class as C;
        let paused = Attempt {
            accounts: 1,
            parts: 1,
            renewed: false,
            can_renew: true,
            paused: true,
        };
        for (class, ends) in [
            (C::Success, true),
            (C::Transient, true),
            (C::Unknown, true),
            (C::Rejected, true),
            (C::TooManyAccounts, true),
            (C::RateLimited, false),
            (C::Signature, false),
            (C::Misconfigured, false),
        ] {
            let mut at = paused;
            assert_eq!(at.answered(class), ends, "{class}");
            assert_eq!(at.paused, !ends, "{class}");
            let mut running = Attempt {
                paused: false,
                ..paused
            };
            assert!(!running.answered(class));
            assert!(!running.paused);
        }
    }

    /// Only a parsed HTTP 200 body tells for sure whether the API applied
    /// the request; every other answer may still be applied late.
    #[test]
    fn which_answers_are_ambiguous() {
        let body = |action_ok, code| Reply::Body {
            action_ok,
            code,
            info: String::new(),
        };
        for (reply, want) in [
            (body(true, 0), false),
            (body(false, 91000), false),
            (body(false, 90033), false),
            (body(false, 90009), false),
            (Reply::HttpStatus(502), true),
            (Reply::HttpStatus(500), true),
            (Reply::HttpStatus(429), true),
            (Reply::Timeout, true),
            (Reply::Connection("connection reset".into()), true),
            (Reply::Unparseable("eof".into()), true),
        ] {
            assert_eq!(ambiguous(&reply), want, "{reply:?}");
        }
    }

    /// The outcome of a batch with an ambiguous request waits until the
    /// backend timeout after it was sent; a stop cuts the wait short.
    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_request_holds_the_outcome_for_the_backend_timeout() {
        let stop = CancellationToken::new();
        let sent_at = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let wait = tokio::spawn({
            let stop = stop.clone();
            async move { settled_after(sent_at, &stop).await }
        });
        tokio::time::advance(Duration::from_millis(1990)).await;
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "reported before the backend timeout");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(wait.await.expect("wait task"));
        assert_eq!(Instant::now() - sent_at, BACKEND_TIMEOUT);
        // Long past it: no wait at all.
        assert!(settled_after(sent_at, &stop).await);

        let sent_at = Instant::now();
        let wait = tokio::spawn({
            let stop = stop.clone();
            async move { settled_after(sent_at, &stop).await }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        stop.cancel();
        assert!(!wait.await.expect("wait task"), "a stop ends the wait");
    }

    /// Hours of rate limiting between transient failures do not spend the
    /// retry budget; transient time alone does.
    #[tokio::test(start_paused = true)]
    async fn rate_limited_time_does_not_spend_the_retry_budget() {
        let retry = RetryConfig {
            initial_interval_ms: 1000,
            multiplier: 1.0,
            max_interval_ms: 1000,
            randomization_factor: 0.0,
            max_elapsed_secs: 10,
        };
        let mut w = Backoffs::new(&retry);
        let mut transient_answers = 0;
        // A transient answer, then an hour of rate limiting, and again.
        while let Some(wait) = w.transient() {
            transient_answers += 1;
            tokio::time::advance(wait).await;
            for _ in 0..360 {
                let wait = w.rate_limited();
                tokio::time::advance(wait.max(Duration::from_secs(10))).await;
            }
            assert!(transient_answers < 100, "the budget never runs out");
        }
        // 1 s counted per transient answer: the 11th would pass 10 s.
        assert_eq!(transient_answers, 10);
    }

    /// A misconfiguration probe never waits more than 60 s, jitter included;
    /// after a pause ends the next one starts from its first wait.
    #[tokio::test(start_paused = true)]
    async fn probes_are_at_most_a_minute_apart_and_restart_after_a_pause() {
        let mut w = Backoffs::new(&RetryConfig::default());
        for _ in 0..50 {
            assert!(w.probe() <= PROBE_MAX);
        }
        w.resumed();
        assert!(w.probe() <= Duration::from_millis(1500));
    }

    // execute_batch against the in-process simulator (no broker needed).

    async fn sim(faults: Faults) -> SimHandle {
        Simulator::start(SimOptions {
            attr_names: vec!["sex".into(), "city".into(), "bad".into()],
            faults,
            ..Default::default()
        })
        .await
        .expect("simulator starts")
    }

    fn ctx(sim: &SimHandle, retry: RetryConfig) -> (BatchCtx, mpsc::UnboundedReceiver<Event>) {
        let signer = Signer::from_key(
            Secret::new(sim.secret_key()),
            sim.sdkappid(),
            "administrator",
            86400,
        );
        let client = Client::new(
            &sim.url(),
            Arc::new(signer),
            Duration::from_secs(5),
            1000,
            8,
        )
        .expect("client");
        let (events, rx) = mpsc::unbounded_channel();
        let ctx = BatchCtx {
            client,
            retry,
            cap: Arc::new(BatchCap::new(100)),
            fence: Fence::open(),
            events,
        };
        (ctx, rx)
    }

    fn fast_retry() -> RetryConfig {
        RetryConfig {
            initial_interval_ms: 10,
            max_interval_ms: 50,
            max_elapsed_secs: 1,
            ..Default::default()
        }
    }

    fn entry(account: &str, parts: &[(Tag, &str, &str)]) -> Entry {
        Entry::from_parts(
            account.into(),
            parts
                .iter()
                .map(|(tag, k, v)| Part {
                    tag: *tag,
                    // "-" removes.
                    attrs: vec![(k.to_string(), (*v != "-").then(|| v.to_string()))],
                })
                .collect(),
        )
    }

    fn results(outcomes: &[PartOutcome]) -> Vec<(Tag, Option<(Reason, i64)>)> {
        let mut r: Vec<_> = outcomes
            .iter()
            .map(|o| (o.tag, o.result.as_ref().err().map(|f| (f.reason, f.code))))
            .collect();
        r.sort_by_key(|(tag, _)| *tag);
        r
    }

    fn value(sim: &SimHandle, account: &str, attr: &str) -> Option<String> {
        sim.state().get(account)?.get(attr).cloned()
    }

    #[tokio::test]
    async fn too_many_accounts_splits_and_lowers_the_cap() {
        let sim = sim(Faults {
            max_accounts: 2,
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let entries: Vec<Entry> = (0..5)
            .map(|i| entry(&format!("u{i}"), &[(i, "sex", "m")]))
            .collect();
        let out = execute_batch(entries, &ctx, None).await;
        assert_eq!(results(&out), (0..5).map(|t| (t, None)).collect::<Vec<_>>());
        for i in 0..5 {
            assert_eq!(value(&sim, &format!("u{i}"), "sex").as_deref(), Some("m"));
        }
        // 5 → 2 + 3 (refused) → 2 + 1 + 2.
        assert_eq!(sim.stats().count(api::SET_ATTR, 90018), 2);
        assert_eq!(sim.stats().set_attr_ok, 3);
        assert!(ctx.cap.get() <= 2, "cap {}", ctx.cap.get());
    }

    #[tokio::test]
    async fn rejected_accounts_are_bisected_and_merged_entries_isolated() {
        let sim = sim(Faults {
            reject_attrs: vec!["bad".into()],
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let entries = vec![
            entry("a", &[(1, "sex", "a1")]),
            // Three messages merged into one account; the middle one is bad.
            entry("b", &[(2, "sex", "b2"), (3, "bad", "x"), (4, "city", "b4")]),
            entry("c", &[(5, "city", "c5")]),
            entry("d", &[(6, "bad", "y")]),
        ];
        let out = execute_batch(entries, &ctx, None).await;
        let rejected = Some((Reason::Rejected, 90033));
        assert_eq!(
            results(&out),
            vec![
                (1, None),
                (2, None),
                (3, rejected),
                (4, None),
                (5, None),
                (6, rejected)
            ]
        );
        let f = out.iter().find(|o| o.tag == 3).unwrap();
        let f = f.result.as_ref().unwrap_err();
        assert_eq!(f.account.as_deref(), Some("b"));
        assert!(f.attempts >= 3, "attempts {}", f.attempts);
        assert_eq!(value(&sim, "a", "sex").as_deref(), Some("a1"));
        assert_eq!(value(&sim, "b", "sex").as_deref(), Some("b2"));
        assert_eq!(value(&sim, "b", "city").as_deref(), Some("b4"));
        assert_eq!(value(&sim, "c", "city").as_deref(), Some("c5"));
        assert_eq!(value(&sim, "b", "bad"), None);
        assert_eq!(value(&sim, "d", "bad"), None);
    }

    #[tokio::test]
    async fn transient_failures_past_the_budget_are_dead_lettered() {
        let sim = sim(Faults {
            fail_rate: 1.0,
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let entries = vec![
            entry("a", &[(1, "sex", "m"), (2, "city", "x")]),
            entry("b", &[(3, "sex", "f")]),
        ];
        let out = execute_batch(entries, &ctx, None).await;
        let exhausted = Some((Reason::RetriesExhausted, 91000));
        assert_eq!(
            results(&out),
            vec![(1, exhausted), (2, exhausted), (3, exhausted)]
        );
        let attempts = out[0].result.as_ref().unwrap_err().attempts;
        assert!(attempts > 1, "attempts {attempts}");
        assert_eq!(u64::from(attempts), sim.stats().total(api::SET_ATTR));
        assert!(sim.state().is_empty());
    }

    #[tokio::test]
    async fn misconfigured_pauses_probes_and_resumes() {
        let sim = sim(Faults {
            misconfigured: true,
            ..Default::default()
        })
        .await;
        let (ctx, mut rx) = ctx(&sim, fast_retry());
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await
            })
        };
        match rx.recv().await {
            Some(Event::Paused { code, .. }) => assert_eq!(code, 90009),
            _ => panic!("expected a pause"),
        }
        // Probing goes on well past the retry budget: nothing is dead-lettered.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!task.is_finished());
        assert!(value(&sim, "a", "sex").is_none());
        sim.update_faults(|f| f.misconfigured = false);
        let out = task.await.expect("batch task");
        assert_eq!(results(&out), vec![(1, None)]);
        assert_eq!(value(&sim, "a", "sex").as_deref(), Some("m"));
        assert!(matches!(rx.recv().await, Some(Event::Resumed)));
        assert!(rx.try_recv().is_err(), "one pause, one resume");
    }

    /// A pause that ends in transient failures goes back to the retry
    /// policy: consuming resumes at once and the retry budget ends the batch.
    #[tokio::test]
    async fn transient_answers_after_a_pause_resume_and_retry() {
        let sim = sim(Faults {
            misconfigured: true,
            ..Default::default()
        })
        .await;
        let (ctx, mut rx) = ctx(&sim, fast_retry());
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await
            })
        };
        match rx.recv().await {
            Some(Event::Paused { code, .. }) => assert_eq!(code, 90009),
            _ => panic!("expected a pause"),
        }
        sim.update_faults(|f| {
            f.misconfigured = false;
            f.fail_rate = 1.0;
        });
        let resumed = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
        assert!(
            matches!(resumed, Ok(Some(Event::Resumed))),
            "a transient answer ends the pause"
        );
        let out = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the retry budget ends the batch")
            .expect("batch task");
        assert_eq!(
            results(&out),
            vec![(1, Some((Reason::RetriesExhausted, 91000)))]
        );
        assert!(rx.try_recv().is_err(), "one pause, one resume");
    }

    #[tokio::test]
    async fn a_stopped_session_leaves_parts_without_outcome() {
        let sim = sim(Faults {
            fail_rate: 1.0,
            ..Default::default()
        })
        .await;
        let retry = RetryConfig {
            max_elapsed_secs: 0,
            ..fast_retry()
        };
        let (ctx, _rx) = ctx(&sim, retry);
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        ctx.fence.close("stopped");
        let out = task.await.expect("batch task");
        assert!(out.is_empty(), "{out:?}");
    }

    /// A session that stops while its request waits for the rate limiter
    /// sends nothing later (another session may hold the messages by then).
    #[tokio::test]
    async fn a_request_waiting_for_its_turn_is_not_sent_after_a_stop() {
        let sim = sim(Faults::default()).await;
        let (mut ctx, _rx) = ctx(&sim, fast_retry());
        ctx.client = Client::new(
            &sim.url(),
            ctx.client.signer().clone(),
            Duration::from_secs(5),
            1,
            8,
        )
        .expect("client");
        // Take this second's only slot: the batch's request waits ~1 s.
        ctx.client.door().limiter().acquire().await;
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        ctx.fence.close("stopped");
        let out = task.await.expect("batch task");
        assert!(out.is_empty(), "{out:?}");
        // Past the slot it was waiting for: still nothing sent.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(sim.stats().total(api::SET_ATTR), 0);
        assert!(sim.state().is_empty());
    }

    /// A batch whose request got HTTP 500 and then succeeded is not
    /// reported (its accounts stay locked) until the backend is done with
    /// the first attempt, which may still be applied late.
    #[tokio::test]
    async fn an_applied_batch_after_an_ambiguous_answer_is_held() {
        let sim = sim(Faults {
            http_error_rate: 1.0,
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await
            })
        };
        while sim.stats().total(api::SET_ATTR) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sim.update_faults(|f| f.http_error_rate = 0.0);
        while value(&sim, "a", "sex").is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !task.is_finished(),
            "reported while the HTTP 500 may still apply"
        );
        let out = task.await.expect("batch task");
        assert_eq!(results(&out), vec![(1, None)]);
    }

    #[tokio::test]
    async fn a_mixed_batch_sends_its_sets_then_its_removals_never_together() {
        let sim = sim(Faults {
            latency_ms: (20, 20),
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        execute_batch(
            vec![entry("a", &[(1, "sex", "m"), (2, "city", "x")])],
            &ctx,
            None,
        )
        .await;
        let entries = vec![
            // set then remove = remove; remove then set = set.
            entry(
                "a",
                &[
                    (3, "sex", "f"),
                    (4, "sex", "-"),
                    (5, "city", "-"),
                    (6, "city", "y"),
                ],
            ),
            entry("b", &[(7, "city", "-")]),
            entry("c", &[(8, "sex", "m")]),
        ];
        let out = execute_batch(entries, &ctx, None).await;
        assert_eq!(
            results(&out),
            (3..=8).map(|t| (t, None)).collect::<Vec<_>>()
        );
        assert_eq!(value(&sim, "a", "sex"), None);
        assert_eq!(value(&sim, "a", "city").as_deref(), Some("y"));
        assert_eq!(value(&sim, "c", "sex").as_deref(), Some("m"));
        let st = sim.stats();
        assert_eq!(st.set_attr_ok, 2);
        assert_eq!(st.remove_attr_ok, 1);
        assert_eq!(st.accounts_removed, 2, "a and b in one im_remove_attr");
        assert_eq!(st.overlapping_account_requests, 0);
        assert_eq!(st.max_concurrent_requests, 1);
    }

    #[tokio::test]
    async fn removals_alone_split_on_too_many_accounts() {
        let sim = sim(Faults {
            max_accounts: 2,
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let sets: Vec<Entry> = (0..5)
            .map(|i| entry(&format!("u{i}"), &[(i, "sex", "m")]))
            .collect();
        for chunk in sets.chunks(2) {
            execute_batch(chunk.to_vec(), &ctx, None).await;
        }
        let removes: Vec<Entry> = (0..5)
            .map(|i| entry(&format!("u{i}"), &[(10 + i, "sex", "-")]))
            .collect();
        let out = execute_batch(removes, &ctx, None).await;
        assert_eq!(
            results(&out),
            (10..15).map(|t| (t, None)).collect::<Vec<_>>()
        );
        assert!(sim.state().is_empty(), "{:?}", sim.state());
        assert_eq!(sim.stats().count(api::REMOVE_ATTR, 90018), 2);
        assert_eq!(sim.stats().remove_attr_ok, 3);
        assert!(ctx.cap.get() <= 2);
    }

    /// A refused removal merged with other messages of its account: the
    /// messages are resent one by one, in order, each its sets then its
    /// removals; the refused one is dead-lettered and the state is that of
    /// the others applied in order.
    #[tokio::test]
    async fn a_refused_removal_is_isolated_and_the_rest_applied_in_order() {
        let sim = sim(Faults {
            reject_attrs: vec!["bad".into()],
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let entries = vec![
            entry(
                "a",
                &[
                    (1, "city", "x"),
                    (2, "bad", "-"),
                    (3, "city", "-"),
                    (4, "sex", "m"),
                ],
            ),
            entry("b", &[(5, "sex", "-")]),
            entry("c", &[(6, "city", "c")]),
        ];
        let out = execute_batch(entries, &ctx, None).await;
        let rejected = Some((Reason::Rejected, 90033));
        assert_eq!(
            results(&out),
            vec![
                (1, None),
                (2, rejected),
                (3, None),
                (4, None),
                (5, None),
                (6, None)
            ]
        );
        assert_eq!(value(&sim, "a", "city"), None, "removed after it was set");
        assert_eq!(value(&sim, "a", "sex").as_deref(), Some("m"));
        assert_eq!(value(&sim, "c", "city").as_deref(), Some("c"));
        assert_eq!(sim.stats().overlapping_account_requests, 0);
    }

    /// Refused in its im_set_attr request: the account's merged removal is
    /// not sent; its messages are resent one by one instead.
    #[tokio::test]
    async fn an_account_isolated_in_its_sets_sends_no_merged_removal() {
        let sim = sim(Faults {
            reject_attrs: vec!["bad".into()],
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await;
        let entries = vec![entry(
            "a",
            &[(2, "bad", "x"), (3, "sex", "-"), (4, "city", "y")],
        )];
        let out = execute_batch(entries, &ctx, None).await;
        let rejected = Some((Reason::Rejected, 90033));
        assert_eq!(results(&out), vec![(2, rejected), (3, None), (4, None)]);
        assert_eq!(value(&sim, "a", "sex"), None);
        assert_eq!(value(&sim, "a", "city").as_deref(), Some("y"));
        // One merged im_set_attr (refused), then per message: 2 (refused),
        // 3's removal, 4's set. No merged im_remove_attr.
        assert_eq!(sim.stats().total(api::REMOVE_ATTR), 1);
        assert_eq!(sim.stats().count(api::SET_ATTR, 90033), 2);
    }

    /// Retries exhausted on the im_set_attr request: the account's
    /// messages are dead-lettered together and its removals not sent.
    #[tokio::test]
    async fn an_account_dead_lettered_in_its_sets_sends_no_removal() {
        let sim = sim(Faults {
            fail_accounts: vec!["a".into()],
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let entries = vec![entry("a", &[(1, "sex", "m"), (2, "city", "-")])];
        let out = execute_batch(entries, &ctx, None).await;
        let exhausted = Some((Reason::RetriesExhausted, 91000));
        assert_eq!(results(&out), vec![(1, exhausted), (2, exhausted)]);
        assert_eq!(sim.stats().total(api::REMOVE_ATTR), 0);
    }

    /// Stopped between the im_set_attr and the im_remove_attr request: a
    /// message with a removal still to send has no outcome (it would be
    /// acked half applied); a message wholly applied has one.
    #[tokio::test]
    async fn a_stop_before_the_removals_reports_only_finished_messages() {
        let sim = sim(Faults::default()).await;
        let (mut ctx, _rx) = ctx(&sim, fast_retry());
        // One request a second: the removal waits for its slot.
        ctx.client = Client::new(
            &sim.url(),
            ctx.client.signer().clone(),
            Duration::from_secs(5),
            1,
            8,
        )
        .expect("client");
        let ctx = Arc::new(ctx);
        let both = Entry::from_parts(
            "b".into(),
            vec![Part {
                tag: 2,
                attrs: vec![("sex".into(), Some("m".into())), ("city".into(), None)],
            }],
        );
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(1, "sex", "m")]), both], &ctx, None).await
            })
        };
        while sim.stats().set_attr_ok == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ctx.fence.close("stopped");
        let out = task.await.expect("batch task");
        assert_eq!(results(&out), vec![(1, None)]);
        assert_eq!(value(&sim, "b", "sex").as_deref(), Some("m"));
        assert_eq!(sim.stats().total(api::REMOVE_ATTR), 0);
    }

    /// An im_set_attr request answered HTTP 500, then applied on retry: the
    /// first attempt may still be applied by the backend, so the account's
    /// im_remove_attr request is not sent before the backend timeout.
    #[tokio::test]
    async fn a_removal_after_an_ambiguous_set_waits_for_the_backend() {
        let sim = sim(Faults {
            http_error_rate: 1.0,
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let ctx = Arc::new(ctx);
        // Before the first attempt leaves: a lower bound of its sending time.
        let start = Instant::now();
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let e = entry("a", &[(1, "sex", "m"), (2, "city", "-")]);
                execute_batch(vec![e], &ctx, None).await
            })
        };
        while sim.stats().total(api::SET_ATTR) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sim.update_faults(|f| f.http_error_rate = 0.0);
        let removal_seen = loop {
            if sim.stats().total(api::REMOVE_ATTR) > 0 {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert!(
            removal_seen - start >= BACKEND_TIMEOUT,
            "im_remove_attr sent while the HTTP 500 im_set_attr may still apply"
        );
        let out = task.await.expect("batch task");
        assert_eq!(results(&out), vec![(1, None), (2, None)]);
        assert_eq!(value(&sim, "a", "sex").as_deref(), Some("m"));
        assert_eq!(sim.stats().remove_attr_ok, 1);
    }

    /// The merged values applied, the merged removal refused: each message
    /// is resent alone with only its removals, never an older value over
    /// the newer one already applied; the refused message is dead-lettered.
    #[tokio::test]
    async fn a_refused_merged_removal_resends_no_older_value() {
        let sim = sim(Faults {
            reject_attrs: vec!["bad".into()],
            ..Default::default()
        })
        .await;
        let (ctx, _rx) = ctx(&sim, fast_retry());
        let part = |tag, attrs: &[(&str, Option<&str>)]| Part {
            tag,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
        };
        let x = Entry::from_parts(
            "x".into(),
            vec![
                part(1, &[("sex", Some("1")), ("city", None)]),
                part(2, &[("sex", Some("2")), ("city", Some("9")), ("bad", None)]),
            ],
        );
        let out = execute_batch(vec![x], &ctx, None).await;
        assert_eq!(
            results(&out),
            vec![(1, None), (2, Some((Reason::Rejected, 90033)))]
        );
        let st = sim.stats();
        assert_eq!(st.regressions, 0, "sex=1 set again after sex=2");
        assert_eq!(st.set_attr_ok, 1, "only the merged values were set");
        assert_eq!(value(&sim, "x", "sex").as_deref(), Some("2"));
        assert_eq!(value(&sim, "x", "city").as_deref(), Some("9"));
        assert_eq!(value(&sim, "x", "bad"), None);
        assert_eq!(st.overlapping_account_requests, 0);
    }

    /// A removal refused while paused on misconfiguration waits, probing,
    /// and is applied once the API accepts requests again.
    #[tokio::test]
    async fn a_removal_pauses_on_misconfiguration_like_a_set() {
        let sim = sim(Faults::default()).await;
        let (ctx, mut rx) = ctx(&sim, fast_retry());
        execute_batch(vec![entry("a", &[(1, "sex", "m")])], &ctx, None).await;
        sim.update_faults(|f| f.misconfigured = true);
        let ctx = Arc::new(ctx);
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                execute_batch(vec![entry("a", &[(2, "sex", "-")])], &ctx, None).await
            })
        };
        match rx.recv().await {
            Some(Event::Paused { code, .. }) => assert_eq!(code, 90009),
            _ => panic!("expected a pause"),
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!task.is_finished(), "nothing dead-lettered while paused");
        sim.update_faults(|f| f.misconfigured = false);
        let out = task.await.expect("batch task");
        assert_eq!(results(&out), vec![(2, None)]);
        assert!(sim.state().is_empty());
        assert!(sim.stats().count(api::REMOVE_ATTR, 90009) >= 1);
    }
}
