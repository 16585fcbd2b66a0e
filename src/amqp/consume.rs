//! Which deliveries to acknowledge, and when: a pure tracker that turns
//! settled delivery tags into as few `basic.ack` frames as the ack-order rule
//! allows.
//!
//! The rule: a delivery is not acked while an older unacked delivery touching
//! one of the same accounts is still unacked, so that a redelivery of
//! whatever is unacked never brings an account back to an older value.
//! Within that rule the settled run above the oldest unacked delivery goes
//! out as one `multiple` ack whenever asked; settled deliveries behind a gap
//! go out one by one when none of their accounts is held by an older unacked
//! delivery (settled or not), and only when the caller asks for them
//! (`take_acks_with(true)`): the worker holds them back briefly so that a
//! later `multiple` ack covers them.
//!
//! Each account keeps its unacked deliveries in a queue, oldest first; a
//! settled delivery is ackable exactly when it heads the queue of each of its
//! accounts. Only deliveries that just settled or just reached the head of a
//! queue are examined, so each event costs O(accounts of the delivery), not
//! O(window).

use std::collections::{BTreeMap, HashMap, VecDeque};

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckOp {
    /// The delivery tag.
    pub(crate) tag: u64,
    /// Acknowledge every outstanding delivery up to `tag`.
    pub(crate) multiple: bool,
}

/// A registered delivery not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    /// Its accounts, each once (none for an invalid message, which nothing
    /// holds back once settled).
    accounts: Box<[String]>,
    /// Done with (applied or dead-lettered): only the ack-order rule holds it.
    settled: bool,
}

/// The ack tracker for one channel (delivery tags are per channel; a new
/// channel needs a new tracker).
///
/// Invariants between `take_acks` calls:
/// - `by_account[a]` holds exactly the tags in `unacked` whose accounts
///   include `a`, ascending (tags are registered in increasing order and
///   leave only from the front); an emptied queue is removed.
/// - `waiting` is the number of settled entries in `unacked`.
/// - A delivery is acked only when it heads the queue of each of its
///   accounts, so no account ever has an acked delivery above an unacked
///   one; the `multiple` run qualifies because it is the oldest of all.
/// - Every settled delivery that can be acked is in `candidates` (unless the
///   `multiple` run takes it first): it is pushed when it settles and again
///   when it reaches the head of one of its queues.
///   Entries may be stale (acked meanwhile, or still held): `take_acks`
///   checks each with `is_ackable` and drops the ones that fail.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    /// Registered, not yet acknowledged deliveries, by tag.
    unacked: BTreeMap<u64, Unacked>,
    /// For each account, the unacked deliveries touching it, oldest first.
    by_account: HashMap<String, VecDeque<u64>>,
    /// Settled deliveries that may have become ackable.
    candidates: Vec<u64>,
    /// The newest registered tag: a tag at or below it is refused.
    last_tag: u64,
    /// Settled, not yet acknowledged.
    waiting: usize,
}

impl AckTracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records a delivery and the accounts it touches (none for an invalid
    /// message). Tags must grow, as they do on one channel; a tag not newer
    /// than the last one is ignored and returns false.
    pub(crate) fn register<'a>(
        &mut self,
        tag: u64,
        accounts: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        if tag <= self.last_tag {
            return false;
        }
        self.last_tag = tag;
        let mut list: Vec<String> = Vec::new();
        for a in accounts {
            if !list.iter().any(|x| x == a) {
                list.push(a.to_string());
            }
        }
        for a in &list {
            self.by_account.entry(a.clone()).or_default().push_back(tag);
        }
        self.unacked.insert(
            tag,
            Unacked {
                accounts: list.into_boxed_slice(),
                settled: false,
            },
        );
        true
    }

    /// Marks a delivery as done (applied, or its dead-letter copy confirmed).
    /// Unknown, already settled or already acked tags are ignored.
    pub(crate) fn settle(&mut self, tag: u64) {
        if let Some(d) = self.unacked.get_mut(&tag) {
            if !d.settled {
                d.settled = true;
                self.waiting += 1;
                self.candidates.push(tag);
            }
        }
    }

    /// Settled deliveries not yet acknowledged (held back by the ack-order rule,
    /// or not yet taken).
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Registered deliveries not yet acknowledged, settled or not.
    pub(crate) fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// The acks to send now: everything the ack-order rule allows.
    #[cfg(test)]
    pub(crate) fn take_acks(&mut self) -> Vec<AckOp> {
        self.take_acks_with(true)
    }

    /// The acks to send now: the settled run at the bottom of the window as
    /// one `multiple` ack, and, when `singles`, every other ackable delivery
    /// one by one. Leaving the singles for later is always safe (the order
    /// rule only forbids acking early): once the gap at the bottom closes,
    /// one `multiple` ack covers them, which costs the broker far less than
    /// one ack each.
    pub(crate) fn take_acks_with(&mut self, singles: bool) -> Vec<AckOp> {
        let mut ops = Vec::new();
        // The settled run at the bottom of the window: one multiple ack.
        let mut run_end = None;
        while let Some(entry) = self.unacked.first_entry() {
            if !entry.get().settled {
                break;
            }
            let (tag, d) = entry.remove_entry();
            self.release(tag, &d);
            run_end = Some(tag);
        }
        if let Some(tag) = run_end {
            ops.push(AckOp {
                tag,
                multiple: true,
            });
        }
        if !singles {
            // The candidates stay: they are still ackable (or stale) later.
            return ops;
        }
        // Behind the gap: one by one, each unblocking the next in its accounts.
        while let Some(tag) = self.candidates.pop() {
            if !self.is_ackable(tag) {
                continue;
            }
            if let Some(d) = self.unacked.remove(&tag) {
                self.release(tag, &d);
                ops.push(AckOp {
                    tag,
                    multiple: false,
                });
            }
        }
        ops
    }

    /// Settled and heading the queue of each of its accounts.
    fn is_ackable(&self, tag: u64) -> bool {
        let Some(d) = self.unacked.get(&tag) else {
            return false;
        };
        d.settled
            && d.accounts.iter().all(|a| {
                self.by_account
                    .get(a)
                    .and_then(|q| q.front())
                    .is_some_and(|&t| t == tag)
            })
    }

    /// Forgets an acked delivery; the next delivery of each of its accounts
    /// may now be ackable.
    fn release(&mut self, tag: u64, d: &Unacked) {
        self.waiting -= 1;
        for a in d.accounts.iter() {
            let Some(q) = self.by_account.get_mut(a) else {
                continue;
            };
            // An acked delivery heads its queues (it had no older unacked one).
            debug_assert_eq!(q.front(), Some(&tag));
            q.pop_front();
            match q.front() {
                None => {
                    self.by_account.remove(a);
                }
                Some(&next) => {
                    if self.unacked.get(&next).is_some_and(|n| n.settled) {
                        self.candidates.push(next);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn multiple(tag: u64) -> AckOp {
        AckOp {
            tag,
            multiple: true,
        }
    }

    fn single(tag: u64) -> AckOp {
        AckOp {
            tag,
            multiple: false,
        }
    }

    fn sorted(mut ops: Vec<AckOp>) -> Vec<AckOp> {
        ops.sort_by_key(|o| (o.tag, o.multiple));
        ops
    }

    #[test]
    fn contiguous_run_is_one_multiple_ack() {
        let mut t = AckTracker::new();
        for tag in 1..=4 {
            t.register(tag, ["a"]);
        }
        for tag in [3, 1, 2] {
            t.settle(tag);
        }
        assert_eq!(t.take_acks(), vec![multiple(3)]);
        assert!(t.take_acks().is_empty());
        t.settle(4);
        assert_eq!(t.take_acks(), vec![multiple(4)]);
        assert_eq!(t.unacked(), 0);
        assert_eq!(t.waiting(), 0);
    }

    /// The stale-value sequence: M1 {a, b} with b still failing, M2 {a}
    /// applied. M2 must wait for M1, else a redelivered M1 sets a back.
    #[test]
    fn newer_message_waits_for_older_one_sharing_an_account() {
        let mut t = AckTracker::new();
        t.register(1, ["a", "b"]);
        t.register(2, ["a"]);
        t.register(3, ["c"]);
        t.settle(2);
        t.settle(3);
        assert_eq!(t.take_acks(), vec![single(3)]);
        assert_eq!(t.waiting(), 1);
        assert_eq!(t.unacked(), 2);
        t.settle(1);
        assert_eq!(t.take_acks(), vec![multiple(2)]);
        assert_eq!(t.unacked(), 0);
    }

    /// A settled delivery that is itself held back holds back newer ones
    /// sharing an account with it (a redelivery would replay it too).
    #[test]
    fn settled_but_blocked_deliveries_block_too() {
        let mut t = AckTracker::new();
        t.register(1, ["a"]);
        t.register(2, ["a", "b"]);
        t.register(3, ["b"]);
        t.register(4, ["d"]);
        t.settle(2);
        t.settle(3);
        t.settle(4);
        assert_eq!(t.take_acks(), vec![single(4)]);
        t.settle(1);
        assert_eq!(t.take_acks(), vec![multiple(3)]);
    }

    /// Behind a gap, releasing one delivery unblocks a chain of others.
    #[test]
    fn chain_behind_a_gap_is_acked_in_one_take() {
        let mut t = AckTracker::new();
        t.register(1, ["x"]);
        t.register(2, ["a"]);
        t.register(3, ["a", "b"]);
        t.register(4, ["b"]);
        t.register(5, ["b", "c"]);
        for tag in [5, 4, 3] {
            t.settle(tag);
        }
        assert!(t.take_acks().is_empty());
        t.settle(2);
        assert_eq!(
            sorted(t.take_acks()),
            vec![single(2), single(3), single(4), single(5)]
        );
        t.settle(1);
        assert_eq!(t.take_acks(), vec![multiple(1)]);
        assert_eq!(t.unacked(), 0);
    }

    /// Invalid messages touch no account: acked as soon as settled.
    #[test]
    fn messages_without_accounts_never_wait_behind_a_gap() {
        let mut t = AckTracker::new();
        t.register(1, ["a"]);
        t.register(2, []);
        t.settle(2);
        assert_eq!(t.take_acks(), vec![single(2)]);
        t.settle(1);
        // 2 is acked already: the multiple ack ends on 1.
        assert_eq!(t.take_acks(), vec![multiple(1)]);
    }

    #[test]
    fn unknown_repeated_and_stale_tags_are_ignored() {
        let mut t = AckTracker::new();
        assert!(t.register(1, ["a", "a"]));
        assert!(!t.register(1, ["b"]));
        t.settle(7);
        t.settle(1);
        t.settle(1);
        assert_eq!(t.waiting(), 1);
        assert_eq!(t.take_acks(), vec![multiple(1)]);
        t.settle(1);
        assert!(t.take_acks().is_empty());
        assert!(!t.register(1, ["a"]));
    }

    /// What the broker would make of the acks, and the rule's checks.
    #[derive(Default)]
    struct Model {
        accounts: BTreeMap<u64, Vec<String>>,
        settled: BTreeSet<u64>,
        acked: BTreeSet<u64>,
    }

    impl Model {
        fn outstanding(&self) -> impl Iterator<Item = u64> + '_ {
            self.accounts
                .keys()
                .copied()
                .filter(|t| !self.acked.contains(t))
        }

        fn blocked(&self, tag: u64) -> bool {
            let mine = &self.accounts[&tag];
            self.outstanding()
                .take_while(|&t| t < tag)
                .any(|t| self.accounts[&t].iter().any(|a| mine.contains(a)))
        }

        fn ack_one(&mut self, tag: u64) {
            assert!(self.settled.contains(&tag), "acked unsettled tag {tag}");
            assert!(
                !self.blocked(tag),
                "acked {tag} while an older unacked delivery shares an account"
            );
            self.acked.insert(tag);
        }

        fn apply(&mut self, ops: Vec<AckOp>) {
            self.apply_deferred(ops);
            // Nothing settled is left waiting unless the rule holds it back.
            for &t in &self.settled {
                if !self.acked.contains(&t) {
                    assert!(self.blocked(t), "settled tag {t} left waiting for nothing");
                }
            }
        }

        /// The acks of a take that left the singles for later: the rule's
        /// checks only, and no single ack at all.
        fn apply_deferring(&mut self, ops: Vec<AckOp>) {
            assert!(
                ops.iter().all(|op| op.multiple),
                "a single ack while deferring: {ops:?}"
            );
            assert!(ops.len() <= 1);
            self.apply_deferred(ops);
        }

        fn apply_deferred(&mut self, ops: Vec<AckOp>) {
            for op in ops {
                assert!(
                    self.accounts.contains_key(&op.tag) && !self.acked.contains(&op.tag),
                    "ack of a tag that is not outstanding: {op:?}"
                );
                if op.multiple {
                    let upto: Vec<u64> = self.outstanding().take_while(|&t| t <= op.tag).collect();
                    for t in upto {
                        self.ack_one(t);
                    }
                } else {
                    self.ack_one(op.tag);
                }
            }
        }
    }

    /// Random sequences of deliveries, settles and takes (some leaving the
    /// single acks for later): never an ack
    /// against the rule, never a double ack, nothing settled left waiting
    /// without cause, and everything acked once all has settled.
    #[test]
    fn random_sequences_keep_the_ack_order_rule() {
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n_accounts = 1 + (seed % 12) as usize;
            let mut t = AckTracker::new();
            let mut m = Model::default();
            let mut next_tag = 1;
            let mut unsettled: Vec<u64> = Vec::new();
            for _ in 0..rng.gen_range(1..200) {
                match rng.gen_range(0..10) {
                    0..=3 => {
                        let k = rng.gen_range(0..4);
                        let accounts: Vec<String> = (0..k)
                            .map(|_| format!("u{}", rng.gen_range(0..n_accounts)))
                            .collect();
                        t.register(next_tag, accounts.iter().map(String::as_str));
                        let mut dedup = accounts;
                        dedup.sort();
                        dedup.dedup();
                        m.accounts.insert(next_tag, dedup);
                        unsettled.push(next_tag);
                        next_tag += 1;
                    }
                    4..=7 if !unsettled.is_empty() => {
                        let tag = unsettled.swap_remove(rng.gen_range(0..unsettled.len()));
                        t.settle(tag);
                        m.settled.insert(tag);
                    }
                    8 => m.apply_deferring(t.take_acks_with(false)),
                    _ => m.apply(t.take_acks()),
                }
            }
            m.apply(t.take_acks());
            for tag in unsettled {
                t.settle(tag);
                m.settled.insert(tag);
            }
            m.apply(t.take_acks());
            assert_eq!(m.acked.len(), m.accounts.len(), "seed {seed}");
            assert_eq!(t.unacked(), 0);
            assert_eq!(t.waiting(), 0);
            assert!(t.by_account.is_empty());
        }
    }

    /// A window of 20,000 with the oldest delivery stuck: each event stays
    /// cheap (a quadratic tracker would take minutes here).
    #[test]
    fn large_window_behind_a_stuck_delivery() {
        let n = 20_000u64;
        let mut t = AckTracker::new();
        t.register(1, ["stuck"]);
        let names: Vec<String> = (0..5_000).map(|i| format!("u{i}")).collect();
        for tag in 2..=n {
            t.register(tag, [names[(tag as usize * 7919) % names.len()].as_str()]);
        }
        let mut acked = 0;
        for tag in (2..=n).rev() {
            t.settle(tag);
            acked += t.take_acks().len();
        }
        assert_eq!(acked as u64, n - 1);
        t.settle(1);
        assert_eq!(t.take_acks(), vec![multiple(1)]);
    }
}
