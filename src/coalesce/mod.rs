//! Coalescing and batch forming (docs/messages.md, docs/design.md), as a plain data structure.
//!
//! Pending updates merge per account in arrival order (per attribute the
//! later operation wins: a value, or a removal) and remember which
//! deliveries contributed. A batch takes the accounts whose oldest pending
//! update is oldest, at most `max_accounts`, never an account already in
//! flight; those accounts stay locked until `Coalescer::complete`, which the
//! batch reports once both its `im_set_attr` and its `im_remove_attr`
//! requests are settled (`worker::batch`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::update::{merge_attrs, Op};

mod cap;
pub(crate) use cap::BatchCap;

/// Identifies a delivery (its delivery tag on the consuming channel).
pub(crate) type Tag = u64;

/// One delivery's contribution to one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) tag: Tag,
    /// What it does to this account: `(name, Some(value))` sets,
    /// `(name, None)` removes.
    pub(crate) attrs: Vec<(String, Op)>,
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

    /// The parts merged in order, per attribute the last operation winning
    /// (borrowed, no copies): `Some(value)` to set, `None` to remove.
    pub(crate) fn merged(&self) -> Vec<(&str, Option<&str>)> {
        let mut out: Vec<(&str, Option<&str>)> = Vec::new();
        for p in &self.parts {
            for (k, v) in &p.attrs {
                match out.iter_mut().find(|(name, _)| name == k) {
                    Some(slot) => slot.1 = v.as_deref(),
                    None => out.push((k, v.as_deref())),
                }
            }
        }
        out
    }

    /// What the account's one `im_set_attr` entry sets: the attributes whose
    /// last operation is a value.
    pub(crate) fn sets(&self) -> Vec<(&str, &str)> {
        self.merged()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect()
    }

    /// What the account's one `im_remove_attr` entry removes: the attributes
    /// whose last operation is a removal. Never one of [`Entry::sets`].
    pub(crate) fn removes(&self) -> Vec<&str> {
        self.merged()
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect()
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
    pub fn push(&mut self, account: &str, attrs: Vec<(String, Op)>, tag: Tag, now: Instant) {
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

    fn kv(k: &str, v: &str) -> Vec<(String, Op)> {
        vec![(k.to_string(), Some(v.to_string()))]
    }

    fn rm(k: &str) -> Vec<(String, Op)> {
        vec![(k.to_string(), None)]
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
        assert_eq!(b[0].sets(), vec![("sex", "2"), ("city", "x")]);
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
        assert_eq!(b1[0].sets(), vec![("k", "240")]);
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
        assert_eq!(b[0].sets(), vec![("k", "2")]);
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

    #[test]
    fn the_last_operation_per_attribute_wins() {
        let t = Instant::now();
        let mut c = Coalescer::new();
        // set then remove = remove; remove then set = set.
        c.push("a", kv("sex", "m"), 1, t);
        c.push("a", rm("sex"), 2, t);
        c.push("a", rm("city"), 3, t);
        c.push("a", kv("city", "x"), 4, t);
        c.push("a", rm("age"), 5, t);
        let b = c.take_batch(10);
        assert_eq!(
            b[0].merged(),
            vec![("sex", None), ("city", Some("x")), ("age", None)]
        );
        assert_eq!(b[0].sets(), vec![("city", "x")]);
        assert_eq!(b[0].removes(), vec!["sex", "age"]);
        assert_eq!(b[0].parts.len(), 5, "every delivery is remembered");
    }

    #[test]
    fn removals_fill_batches_like_sets() {
        let t = Instant::now();
        let mut c = Coalescer::new();
        for i in 0..150u64 {
            c.push(&format!("u{i}"), rm("k"), i, t);
        }
        assert!(c.is_due(t, 100, Duration::from_secs(1)));
        let b = c.take_batch(100);
        assert_eq!(b.len(), 100);
        assert!(b
            .iter()
            .all(|e| e.removes() == ["k"] && e.sets().is_empty()));
    }

    /// (account, attribute) → value.
    type State = HashMap<(String, String), String>;

    /// Applies one batch as the worker does: each entry's `im_set_attr`
    /// part and its `im_remove_attr` part, which never share an attribute
    /// (so their order does not matter).
    fn apply(state: &mut State, batch: &[Entry]) {
        for e in batch {
            let sets = e.sets();
            let removes = e.removes();
            assert!(
                removes.iter().all(|r| sets.iter().all(|(k, _)| k != r)),
                "an attribute both set and removed: {e:?}"
            );
            for (k, v) in sets {
                state.insert((e.account.clone(), k.to_string()), v.to_string());
            }
            for k in removes {
                state.remove(&(e.account.clone(), k.to_string()));
            }
        }
    }

    /// One step of a walk: push an operation, take a batch, or complete one.
    #[derive(Debug, Clone)]
    enum Step {
        Push { account: u8, attr: u8, set: bool },
        Take(usize),
        Complete(usize),
    }

    /// Runs a walk; returns (state applied by the batches, state of
    /// applying every operation in publish order). Checks on the way that
    /// no batch exceeds its bound and no account is in two batches at once.
    fn walk(steps: &[Step]) -> (State, State) {
        let t0 = Instant::now();
        let mut c = Coalescer::new();
        let mut in_flight: Vec<Vec<Entry>> = Vec::new();
        let mut locked: HashSet<String> = HashSet::new();
        let mut applied = HashMap::new();
        let mut expected = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            let tag = i as u64;
            match step {
                Step::Push { account, attr, set } => {
                    let acc = format!("u{account}");
                    let attr = format!("k{attr}");
                    let op = set.then(|| tag.to_string());
                    match &op {
                        Some(v) => expected.insert((acc.clone(), attr.clone()), v.clone()),
                        None => expected.remove(&(acc.clone(), attr.clone())),
                    };
                    c.push(&acc, vec![(attr, op)], tag, t0 + Duration::from_micros(tag));
                }
                Step::Take(max) => {
                    let b = c.take_batch(*max);
                    assert!(b.len() <= *max);
                    for e in &b {
                        assert!(locked.insert(e.account.clone()), "account in two batches");
                    }
                    if !b.is_empty() {
                        in_flight.push(b);
                    }
                }
                Step::Complete(pick) => {
                    if !in_flight.is_empty() {
                        let b = in_flight.swap_remove(pick % in_flight.len());
                        apply(&mut applied, &b);
                        for e in &b {
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
                apply(&mut applied, &b);
                c.complete(b.iter().map(|e| e.account.as_str()));
            }
            let b = c.take_batch(5);
            if b.is_empty() {
                break;
            }
            in_flight.push(b);
        }
        assert!(c.is_idle());
        (applied, expected)
    }

    /// A deterministic random walk: whatever the interleaving of pushes
    /// (sets and removals), takes and completions, applying the batches in
    /// completion order gives the state of applying every operation in
    /// publish order.
    #[test]
    fn random_walk_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9E3779B97F4A7C15);
        let steps: Vec<Step> = (0..20_000)
            .map(|_| match rng.gen_range(0..10) {
                0..=5 => Step::Push {
                    account: rng.gen_range(0..40),
                    attr: rng.gen_range(0..3),
                    set: rng.gen_bool(0.7),
                },
                6..=7 => Step::Take(rng.gen_range(1..=7)),
                _ => Step::Complete(rng.gen()),
            })
            .collect();
        let (applied, expected) = walk(&steps);
        assert!(!expected.is_empty());
        assert_eq!(applied, expected);
    }

    mod merge_rule {
        use super::*;
        use proptest::prelude::*;

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0u8..3, 0u8..3, any::<bool>())
                    .prop_map(|(account, attr, set)| Step::Push { account, attr, set }),
                1 => (1usize..4).prop_map(Step::Take),
                1 => any::<usize>().prop_map(Step::Complete),
            ]
        }

        proptest! {
            /// The coalesced result equals applying the operations in
            /// publish order, over few accounts and attributes so that
            /// sets and removals of one attribute meet often.
            #[test]
            fn coalesced_equals_in_order(steps in proptest::collection::vec(step(), 0..200)) {
                let (applied, expected) = walk(&steps);
                prop_assert_eq!(applied, expected);
            }
        }
    }
}
