//! Coalescing and batch forming (docs/messages.md, docs/design.md), as a plain data structure.
//!
//! Pending updates merge per account in arrival order (later value wins) and
//! remember which deliveries contributed. A batch takes the accounts whose
//! oldest pending update is oldest, at most `max_accounts`, never an account
//! already in flight; those accounts stay locked until `Coalescer::complete`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::update::merge_attrs;

mod cap;
pub(crate) use cap::BatchCap;

/// Identifies a delivery (its delivery tag on the consuming channel).
pub(crate) type Tag = u64;

/// One delivery's contribution to one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) tag: Tag,
    /// What it sets for this account.
    pub(crate) attrs: Vec<(String, String)>,
}

/// One account in a batch: the parts behind it, merged when the request is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub(crate) account: String,
    /// The contributing deliveries, in arrival order.
    pub(crate) parts: Vec<Part>,
}

impl Entry {
    /// An entry made of the given parts.
    pub(crate) fn from_parts(account: String, parts: Vec<Part>) -> Entry {
        Entry { account, parts }
    }

    /// The parts merged in order, later values winning (borrowed, no copies).
    pub(crate) fn merged(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for p in &self.parts {
            for (k, v) in &p.attrs {
                match out.iter_mut().find(|(name, _)| name == k) {
                    Some(slot) => slot.1 = v,
                    None => out.push((k, v)),
                }
            }
        }
        out
    }
}

#[derive(Debug)]
struct Pending {
    parts: Vec<Part>,
    /// Key in `ready` (arrival of the oldest pending update, sequence).
    key: (Instant, u64),
}

/// Pending updates per account, and which accounts are in flight. `push`
/// adds to them, `take_batch` takes the oldest ready accounts and locks them,
/// `complete` unlocks them; updates pushed for a locked account wait and
/// become ready on `complete`, so an account is never in two requests at once.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Every account with updates not yet taken, in flight or not.
    pending: HashMap<String, Pending>,
    /// Accounts with pending updates that are not in flight, oldest first.
    ready: BTreeMap<(Instant, u64), String>,
    /// Accounts taken by `take_batch` and not yet `complete`d.
    in_flight: HashSet<String>,
    /// The second half of `ready`'s keys: tells apart updates that arrived
    /// at the same instant.
    seq: u64,
}

impl Coalescer {
    /// Nothing pending, nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one delivery's update for one account.
    pub fn push(&mut self, account: &str, attrs: Vec<(String, String)>, tag: Tag, now: Instant) {
        if let Some(p) = self.pending.get_mut(account) {
            match p.parts.last_mut() {
                // The same delivery touching the account again (cannot happen
                // after parsing merges entries, but stay exact).
                Some(last) if last.tag == tag => merge_attrs(&mut last.attrs, attrs),
                _ => p.parts.push(Part { tag, attrs }),
            }
            return;
        }
        self.seq += 1;
        let key = (now, self.seq);
        if !self.in_flight.contains(account) {
            self.ready.insert(key, account.to_string());
        }
        self.pending.insert(
            account.to_string(),
            Pending {
                parts: vec![Part { tag, attrs }],
                key,
            },
        );
    }

    /// Accounts with pending updates that could go out now.
    pub(crate) fn ready_accounts(&self) -> usize {
        self.ready.len()
    }

    /// Accounts with pending updates, in flight or not.
    pub(crate) fn pending_accounts(&self) -> usize {
        self.pending.len()
    }

    /// Accounts in flight.
    #[cfg(test)]
    pub(crate) fn in_flight_accounts(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether nothing is pending and nothing is in flight.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.in_flight.is_empty()
    }

    /// When the oldest ready update arrived.
    pub(crate) fn oldest_ready(&self) -> Option<Instant> {
        self.ready.keys().next().map(|(t, _)| *t)
    }

    /// When a batch becomes due by age (None when nothing is ready).
    pub(crate) fn deadline(&self, max_wait: Duration) -> Option<Instant> {
        self.oldest_ready().map(|t| t + max_wait)
    }

    /// Whether a batch should go out now: `max_accounts` ready, or the oldest
    /// ready update has waited `max_wait`.
    pub(crate) fn is_due(&self, now: Instant, max_accounts: usize, max_wait: Duration) -> bool {
        self.ready.len() >= max_accounts || self.deadline(max_wait).is_some_and(|d| d <= now)
    }

    /// Takes the next batch: up to `max_accounts` ready accounts, oldest
    /// first, each once; they are in flight until `Coalescer::complete`.
    pub fn take_batch(&mut self, max_accounts: usize) -> Vec<Entry> {
        let mut batch = Vec::with_capacity(max_accounts.min(self.ready.len()));
        while batch.len() < max_accounts {
            let Some((_, account)) = self.ready.pop_first() else {
                break;
            };
            let p = self
                .pending
                .remove(&account)
                .expect("every ready account has pending updates");
            self.in_flight.insert(account.clone());
            batch.push(Entry {
                account,
                parts: p.parts,
            });
        }
        batch
    }

    /// Unlocks accounts whose request finished; their newer updates become ready.
    pub(crate) fn complete<'a>(&mut self, accounts: impl IntoIterator<Item = &'a str>) {
        for a in accounts {
            if self.in_flight.remove(a) {
                if let Some(p) = self.pending.get(a) {
                    self.ready.insert(p.key, a.to_string());
                }
            }
        }
    }

    /// Whether an account is in flight.
    #[cfg(test)]
    pub(crate) fn is_in_flight(&self, account: &str) -> bool {
        self.in_flight.contains(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    #[test]
    fn merges_in_arrival_order_and_remembers_parts() {
        let t = Instant::now();
        let mut c = Coalescer::new();
        c.push("a", kv("sex", "1"), 1, t);
        c.push("a", kv("city", "x"), 2, t);
        c.push("a", kv("sex", "2"), 3, t);
        assert_eq!(c.ready_accounts(), 1);
        let b = c.take_batch(100);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].merged(), vec![("sex", "2"), ("city", "x")]);
        assert_eq!(
            b[0].parts.iter().map(|p| p.tag).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(Entry::from_parts("a".into(), b[0].parts.clone()), b[0]);
    }

    #[test]
    fn batches_are_bounded_distinct_and_oldest_first() {
        let t = Instant::now();
        let mut c = Coalescer::new();
        for i in 0..250u64 {
            c.push(
                &format!("u{}", i % 120),
                kv("k", &i.to_string()),
                i,
                t + Duration::from_millis(i),
            );
        }
        assert_eq!(c.ready_accounts(), 120);
        let b1 = c.take_batch(100);
        assert_eq!(b1.len(), 100);
        assert_eq!(b1[0].account, "u0");
        let distinct: HashSet<_> = b1.iter().map(|e| &e.account).collect();
        assert_eq!(distinct.len(), 100);
        // u0 got values 0, 120, 240: the last wins.
        assert_eq!(b1[0].merged(), vec![("k", "240")]);
        let b2 = c.take_batch(100);
        assert_eq!(b2.len(), 20);
        assert!(c.take_batch(100).is_empty());
        assert_eq!(c.in_flight_accounts(), 120);
    }

    #[test]
    fn in_flight_accounts_wait_and_then_keep_their_age() {
        let t0 = Instant::now();
        let mut c = Coalescer::new();
        c.push("a", kv("k", "1"), 1, t0);
        let b = c.take_batch(10);
        assert_eq!(b.len(), 1);
        // Newer update for a while it is in flight: not ready.
        c.push("a", kv("k", "2"), 2, t0 + Duration::from_millis(5));
        c.push("b", kv("k", "1"), 3, t0 + Duration::from_millis(10));
        assert_eq!(c.ready_accounts(), 1);
        let b = c.take_batch(10);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].account, "b");
        assert!(c.is_in_flight("a"));
        c.complete(["a"]);
        assert!(!c.is_in_flight("a"));
        assert_eq!(c.ready_accounts(), 1);
        assert_eq!(c.oldest_ready(), Some(t0 + Duration::from_millis(5)));
        let b = c.take_batch(10);
        assert_eq!(b[0].account, "a");
        assert_eq!(b[0].merged(), vec![("k", "2")]);
        assert_eq!(b[0].parts.len(), 1);
        c.complete(["a", "b"]);
        assert!(c.is_idle());
    }

    #[test]
    fn due_when_full_or_old_enough() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(200);
        let mut c = Coalescer::new();
        assert!(!c.is_due(t0, 3, wait));
        assert_eq!(c.deadline(wait), None);
        c.push("a", kv("k", "1"), 1, t0);
        c.push("b", kv("k", "1"), 2, t0 + Duration::from_millis(50));
        assert!(!c.is_due(t0 + Duration::from_millis(199), 3, wait));
        assert!(c.is_due(t0 + Duration::from_millis(200), 3, wait));
        assert_eq!(c.deadline(wait), Some(t0 + wait));
        c.push("c", kv("k", "1"), 3, t0 + Duration::from_millis(60));
        assert!(c.is_due(t0 + Duration::from_millis(60), 3, wait));
        // In-flight accounts do not make a batch due.
        let _ = c.take_batch(3);
        c.push("a", kv("k", "2"), 4, t0);
        assert!(!c.is_due(t0 + Duration::from_secs(10), 1, wait));
        assert_eq!(c.deadline(wait), None);
    }

    /// A deterministic random walk: whatever the interleaving of pushes,
    /// takes and completions, no batch exceeds its bound, no account is in two
    /// batches at once, and applying batches in completion order gives the
    /// last pushed value of every (account, attribute).
    #[test]
    fn random_walk_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9E3779B97F4A7C15);
        let mut next = || rng.gen::<u64>();
        let t0 = Instant::now();
        let mut c = Coalescer::new();
        let mut in_flight: Vec<Vec<Entry>> = Vec::new();
        let mut locked: HashSet<String> = HashSet::new();
        let mut applied: HashMap<(String, String), String> = HashMap::new();
        let mut expected: HashMap<(String, String), String> = HashMap::new();
        for step in 0..20_000u64 {
            match next() % 10 {
                0..=5 => {
                    let acc = format!("u{}", next() % 40);
                    let attr = format!("k{}", next() % 3);
                    let val = step.to_string();
                    expected.insert((acc.clone(), attr.clone()), val.clone());
                    c.push(
                        &acc,
                        vec![(attr, val)],
                        step,
                        t0 + Duration::from_micros(step),
                    );
                }
                6..=7 => {
                    let max = 1 + (next() % 7) as usize;
                    let b = c.take_batch(max);
                    assert!(b.len() <= max);
                    for e in &b {
                        assert!(locked.insert(e.account.clone()), "account in two batches");
                    }
                    if !b.is_empty() {
                        in_flight.push(b);
                    }
                }
                _ => {
                    if !in_flight.is_empty() {
                        let i = (next() as usize) % in_flight.len();
                        let b = in_flight.swap_remove(i);
                        for e in &b {
                            for (k, v) in e.merged() {
                                applied.insert((e.account.clone(), k.to_string()), v.to_string());
                            }
                            locked.remove(&e.account);
                        }
                        c.complete(b.iter().map(|e| e.account.as_str()));
                    }
                }
            }
        }
        // Drain.
        loop {
            for b in in_flight.drain(..) {
                for e in &b {
                    for (k, v) in e.merged() {
                        applied.insert((e.account.clone(), k.to_string()), v.to_string());
                    }
                }
                c.complete(b.iter().map(|e| e.account.as_str()));
            }
            let b = c.take_batch(5);
            if b.is_empty() {
                break;
            }
            in_flight.push(b);
        }
        assert!(c.is_idle());
        assert_eq!(applied, expected);
    }
}
