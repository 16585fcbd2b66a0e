//! One batch run to its end, in its own task: send the request, retry it,
//! split it, bisect it, until every (delivery, account) has an outcome or
//! the session stops.
//!
//! What to do with each answer is decided by [`next_step`], a pure function
//! of the answer's class and where the request stands; this module only
//! carries its steps out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::session::Event;
use crate::amqp::deadletter::{Failure, Reason};
use crate::coalesce::{BatchCap, Entry, Tag};
use crate::config::RetryConfig;
use crate::tencent::client::{api, set_attr_body};
use crate::tencent::{Class, Client, Reply};
use crate::wait::{backoff_forever, sleep_unless_cancelled};

/// What every batch task of a session shares.
pub(super) struct BatchCtx {
    pub(super) client: Client,
    pub(super) retry: RetryConfig,
    pub(super) cap: Arc<BatchCap>,
    /// Fired when the session ends: retries and probes stop at once.
    pub(super) stop: CancellationToken,
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

/// The answer-class → step table of CONTRACT §5, with no I/O.
pub(super) fn next_step(class: Class, at: Attempt, waits: &mut impl Waits) -> Step {
    use {Again::*, Verdict::*};
    match class {
        Class::Success => Step::Verdict(Applied),
        Class::Transient | Class::Unknown if at.paused => Step::Again(Probe(waits.probe())),
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
    rate: ExponentialBackoff,
    probe: ExponentialBackoff,
}

impl Backoffs {
    fn new(retry: &RetryConfig) -> Self {
        Backoffs {
            retry: retry.backoff(),
            rate: backoff_forever(Duration::from_millis(200), Duration::from_secs(10)),
            probe: backoff_forever(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }
}

impl Waits for Backoffs {
    fn transient(&mut self) -> Option<Duration> {
        self.retry.next_backoff()
    }
    fn rate_limited(&mut self) -> Duration {
        self.rate.next_backoff().unwrap_or(Duration::from_secs(60))
    }
    fn probe(&mut self) -> Duration {
        self.probe.next_backoff().unwrap_or(Duration::from_secs(60))
    }
}

/// Runs one batch to the end: every part applied or failed, unless the
/// session stops first (then the parts without outcome stay unacked).
pub(super) async fn execute_batch(entries: Vec<Entry>, ctx: &BatchCtx) -> Vec<PartOutcome> {
    let mut outcomes = Vec::new();
    // Requests still to send, with the attempts already spent on their entries.
    let mut work: VecDeque<(Vec<Entry>, u32)> = VecDeque::from([(entries, 0)]);
    while let Some((entries, prior)) = work.pop_front() {
        let Some(sent) = send(&entries, ctx).await else {
            break;
        };
        let attempts = prior + sent.attempts;
        match sent.verdict {
            Verdict::Applied => {
                for e in entries {
                    outcomes.extend(e.parts.into_iter().map(|p| PartOutcome {
                        tag: p.tag,
                        result: Ok(()),
                    }));
                }
            }
            Verdict::Split | Verdict::Bisect => {
                if sent.verdict == Verdict::Split {
                    ctx.cap.lower(entries.len());
                    warn!(accounts = entries.len(), "Too many accounts for the API (90018); splitting and lowering the batch size for a while");
                }
                let (a, b) = split_half(entries);
                work.push_front((b, attempts));
                work.push_front((a, attempts));
            }
            Verdict::Isolate => {
                for e in entries {
                    for p in e.parts.into_iter().rev() {
                        work.push_front((
                            vec![Entry::from_parts(e.account.clone(), vec![p])],
                            attempts,
                        ));
                    }
                }
            }
            Verdict::DeadLetter(reason) => {
                if reason == Reason::RetriesExhausted {
                    warn!(
                        accounts = entries.len(),
                        attempts,
                        error = %sent.reply.info(),
                        "Retries exhausted; dead-lettering the batch's messages"
                    );
                }
                fail_all(&mut outcomes, entries, reason, &sent.reply, attempts);
            }
        }
    }
    outcomes
}

fn split_half(mut entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>) {
    let b = entries.split_off(entries.len() / 2);
    (entries, b)
}

fn fail_all(
    out: &mut Vec<PartOutcome>,
    entries: Vec<Entry>,
    reason: Reason,
    reply: &Reply,
    attempts: u32,
) {
    for e in entries {
        for p in e.parts {
            out.push(PartOutcome {
                tag: p.tag,
                result: Err(Failure {
                    reason,
                    code: reply.code(),
                    error: reply.info(),
                    account: Some(e.account.clone()),
                    attempts,
                }),
            });
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
async fn send(entries: &[Entry], ctx: &BatchCtx) -> Option<Sent> {
    let merged: Vec<(&str, Vec<(&str, &str)>)> = entries
        .iter()
        .map(|e| (e.account.as_str(), e.merged()))
        .collect();
    let body = set_attr_body(&merged);
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
        if ctx.stop.is_cancelled() {
            break None;
        }
        attempts += 1;
        let r = ctx.client.call(api::SET_ATTR, body.clone()).await;
        let code = r.reply.code();
        metrics::counter!("imattr_api_requests_total", "class" => r.class.as_str(), "code" => code.to_string()).increment(1);
        metrics::histogram!("imattr_api_request_duration_seconds").record(r.latency.as_secs_f64());
        metrics::histogram!("imattr_request_accounts").record(entries.len() as f64);
        debug!(
            accounts = entries.len(),
            messages,
            attempt = attempts,
            class = %r.class,
            code,
            latency_ms = r.latency.as_millis() as u64,
            "Batch request"
        );
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
        if !sleep_unless_cancelled(wait, &ctx.stop).await {
            break None;
        }
    };
    if at.paused {
        let _ = ctx.events.send(Event::Resumed);
    }
    result
}
