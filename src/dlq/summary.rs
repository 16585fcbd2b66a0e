//! A summary of the store held in memory: one small row per unresolved dead
//! letter (its id, failure time, body size, and its reason, code, error text
//! and source queue as interned keys), kept up to date by reading only what
//! is new, so that the console's grouped view and its confirmations count
//! without reading the whole store each time. No I/O here:
//! [`super::Dlq::refresh_summary`] feeds it.
//!
//! Its answers are those of a full read ([`super::Dlq::stats`]) for filters
//! on reason, code, time and ids; a filter on account or text needs what a
//! row does not keep, and is not answered ([`Summary::count`] says `None`).

use std::collections::HashMap;

use serde::Serialize;

use super::ledger::Resolved;
use super::stats::{bounded_key, listed_counts, Stats, KEY_COUNTERS};
use super::view::{Filter, Meta};

/// The key of a field without a value (counted as `none`, as [`Stats`] does).
const NONE: u16 = u16::MAX;

/// The key of a value that came when [`KEY_COUNTERS`] others were live:
/// counted under `(other)` only, as [`Stats`] does past its bound.
const OVER: u16 = u16::MAX - 1;

/// The failure time of a row without one.
const NO_TIME: i64 = i64::MIN;

const _: () = assert!(KEY_COUNTERS < OVER as usize);

/// The interned values of one field, with how many rows hold each: a value
/// no row holds any more frees its slot (resolved and retained rows go).
#[derive(Debug, Clone, Default)]
struct Keys {
    ids: HashMap<Box<str>, u16>,
    /// By key: its value and how many rows hold it (0: a free slot).
    slots: Vec<(Box<str>, u32)>,
    free: Vec<u16>,
    /// Rows whose value is under [`OVER`].
    over: u64,
}

impl Keys {
    /// The key of `value` (cut like [`Stats`] keys) for one more row.
    fn intern(&mut self, value: Option<&str>) -> u16 {
        let Some(value) = value else { return NONE };
        let value = bounded_key(value);
        if let Some(&k) = self.ids.get(value.as_ref()) {
            self.slots[usize::from(k)].1 += 1;
            return k;
        }
        if self.ids.len() >= KEY_COUNTERS {
            self.over += 1;
            return OVER;
        }
        let name: Box<str> = value.into();
        let k = match self.free.pop() {
            Some(k) => {
                self.slots[usize::from(k)] = (name.clone(), 1);
                k
            }
            None => {
                self.slots.push((name.clone(), 1));
                (self.slots.len() - 1) as u16
            }
        };
        self.ids.insert(name, k);
        k
    }

    /// One row fewer holds `k`.
    fn release(&mut self, k: u16) {
        match k {
            NONE => {}
            OVER => self.over = self.over.saturating_sub(1),
            k => {
                let Some(slot) = self.slots.get_mut(usize::from(k)) else {
                    return;
                };
                slot.1 = slot.1.saturating_sub(1);
                if slot.1 == 0 {
                    self.ids.remove(&slot.0);
                    slot.0 = Box::from("");
                    self.free.push(k);
                }
            }
        }
    }

    /// The key a filter's `value` names: `Some(None)` when no row holds it,
    /// `None` when the rows cannot tell (a value longer than a key, or one
    /// that may be among those under [`OVER`]).
    fn find(&self, value: &str) -> Option<Option<u16>> {
        if bounded_key(value) != value {
            return None;
        }
        // A value under OVER may also hold a key of its own, taken when a
        // slot was freed later: while anything is under OVER, rows cannot tell.
        if self.over > 0 {
            return None;
        }
        match self.ids.get(value) {
            Some(&k) => Some(Some(k)),
            None => Some(None),
        }
    }

    /// The rows' counts by key (`counts` indexed by key, `none` apart) as a
    /// [`Stats`] breakdown of `total`.
    fn listed(&self, counts: &[u64], none: u64, total: u64) -> Vec<(String, u64)> {
        let mut by_value: HashMap<&str, u64> = HashMap::new();
        for (k, &n) in counts.iter().enumerate() {
            if n > 0 {
                *by_value.entry(&self.slots[k].0).or_default() += n;
            }
        }
        // A literal "none" and a missing value are one key in `Stats`.
        if none > 0 {
            *by_value.entry("none").or_default() += none;
        }
        listed_counts(
            by_value
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
            total,
        )
    }
}

/// One unresolved dead letter: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    id: u64,
    /// [`NO_TIME`] when it has none.
    failed_at_ms: i64,
    body_bytes: u32,
    reason: u16,
    code: u16,
    error: u16,
    queue: u16,
}

/// The last dead letter read, read again by the next refresh: another one
/// at its offset means the store was deleted and declared again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tail {
    pub(crate) id: u64,
    /// When the broker wrote its chunk.
    pub(crate) chunk_ms: i64,
    pub(crate) body_bytes: usize,
}

/// What the grouped view shows: [`Stats`] without the accounts (a row keeps
/// none), from the summary or from a full read.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Groups {
    /// Dead letters counted.
    pub total: u64,
    /// Their bodies' total size, in bytes.
    pub body_bytes: u64,
    /// As [`Stats::by_reason`].
    pub by_reason: Vec<(String, u64)>,
    /// As [`Stats::by_code`].
    pub by_code: Vec<(String, u64)>,
    /// As [`Stats::by_error`].
    pub by_error: Vec<(String, u64)>,
    /// As [`Stats::by_queue`].
    pub by_queue: Vec<(String, u64)>,
    /// As [`Stats::breakdowns_exact`].
    pub breakdowns_exact: bool,
    /// Earliest failure time, Unix ms.
    pub oldest_failed_at_ms: Option<i64>,
    /// Latest failure time, Unix ms.
    pub newest_failed_at_ms: Option<i64>,
}

impl From<Stats> for Groups {
    fn from(s: Stats) -> Groups {
        Groups {
            total: s.total,
            body_bytes: s.body_bytes,
            by_reason: s.by_reason,
            by_code: s.by_code,
            by_error: s.by_error,
            by_queue: s.by_queue,
            breakdowns_exact: s.breakdowns_exact,
            oldest_failed_at_ms: s.oldest_failed_at_ms,
            newest_failed_at_ms: s.newest_failed_at_ms,
        }
    }
}

/// A filter as the rows read it.
struct Plan {
    /// A reason or code no row holds: nothing matches.
    nothing: bool,
    reason: Option<u16>,
    code: Option<u16>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    /// Sorted.
    ids: Option<Vec<u64>>,
    before_id: Option<u64>,
}

impl Plan {
    fn matches(&self, r: &Row) -> bool {
        !self.nothing
            && self.reason.is_none_or(|k| r.reason == k)
            && self.code.is_none_or(|k| r.code == k)
            && self
                .since_ms
                .is_none_or(|s| r.failed_at_ms != NO_TIME && r.failed_at_ms >= s)
            && self
                .until_ms
                .is_none_or(|u| r.failed_at_ms != NO_TIME && r.failed_at_ms <= u)
            && self
                .ids
                .as_ref()
                .is_none_or(|ids| ids.binary_search(&r.id).is_ok())
            && self.before_id.is_none_or(|b| r.id < b)
    }
}

/// The summary of a store: its unresolved dead letters below [`Summary::upto`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Ascending ids.
    rows: Vec<Row>,
    reasons: Keys,
    codes: Keys,
    errors: Keys,
    queues: Keys,
    upto: u64,
    tail: Option<Tail>,
}

impl Summary {
    /// An empty summary: the next refresh reads the whole store.
    pub fn new() -> Summary {
        Summary::default()
    }

    /// Unresolved dead letters held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The next offset to read.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    pub(crate) fn tail(&self) -> Option<Tail> {
        self.tail
    }

    /// Forgets everything: the store is read again from its start.
    pub(crate) fn reset(&mut self) {
        *self = Summary::default();
    }

    /// Adds the dead letter at `id` (an id below [`Summary::upto`] was read
    /// already and changes nothing).
    pub(crate) fn add(&mut self, id: u64, m: &Meta, body_bytes: usize, chunk_ms: i64) {
        if id < self.upto {
            return;
        }
        let code = m.code.map(|c| c.to_string());
        self.rows.push(Row {
            id,
            failed_at_ms: m.failed_at_ms.unwrap_or(NO_TIME),
            body_bytes: u32::try_from(body_bytes).unwrap_or(u32::MAX),
            reason: self.reasons.intern(m.reason.as_deref()),
            code: self.codes.intern(code.as_deref()),
            error: self.errors.intern(m.error.as_deref()),
            queue: self.queues.intern(m.source_queue.as_deref()),
        });
        self.upto = id.saturating_add(1);
        self.tail = Some(Tail {
            id,
            chunk_ms,
            body_bytes,
        });
    }

    /// Everything up to `last` was read (offsets without a dead letter too).
    pub(crate) fn read_to(&mut self, last: u64) {
        self.upto = self.upto.max(last.saturating_add(1));
    }

    fn release(&mut self, r: Row) {
        self.reasons.release(r.reason);
        self.codes.release(r.code);
        self.errors.release(r.error);
        self.queues.release(r.queue);
    }

    /// Drops the rows the ledger resolved; resolution is permanent (a
    /// replayed dead letter that fails again comes back at a new offset).
    pub(crate) fn resolve(&mut self, resolved: &Resolved) {
        let mut spans = resolved.ranges().peekable();
        let mut gone = Vec::new();
        self.rows.retain(|r| {
            while spans.peek().is_some_and(|&(_, end)| end < r.id) {
                spans.next();
            }
            let resolved = spans.peek().is_some_and(|&(start, _)| start <= r.id);
            if resolved {
                gone.push(*r);
            }
            !resolved
        });
        for r in gone {
            self.release(r);
        }
    }

    /// Drops the rows below `first`, the store's first offset: retention
    /// removed them.
    pub(crate) fn drop_below(&mut self, first: u64) {
        let n = self.rows.partition_point(|r| r.id < first);
        let gone: Vec<Row> = self.rows.drain(..n).collect();
        for r in gone {
            self.release(r);
        }
    }

    /// Whether the rows keep what `filter` reads: not an account, not a
    /// text (a reason or code may still be past the bound, see
    /// [`Summary::count`]).
    pub fn reads(filter: &Filter) -> bool {
        filter.account.is_none() && filter.grep.is_none()
    }

    fn plan(&self, f: &Filter) -> Option<Plan> {
        if !Summary::reads(f) {
            return None;
        }
        let mut nothing = false;
        let mut key = |keys: &Keys, value: Option<String>| -> Option<Option<u16>> {
            let Some(v) = value else { return Some(None) };
            let k = keys.find(&v)?;
            nothing |= k.is_none();
            Some(k)
        };
        let reason = key(&self.reasons, f.reason.clone())?;
        let code = key(&self.codes, f.code.map(|c| c.to_string()))?;
        Some(Plan {
            nothing,
            reason,
            code,
            since_ms: f.since_ms,
            until_ms: f.until_ms,
            ids: f.ids.as_ref().map(|ids| {
                let mut ids = ids.clone();
                ids.sort_unstable();
                ids
            }),
            before_id: f.before_id,
        })
    }

    /// How many unresolved dead letters match `filter`; `None` when the rows
    /// cannot tell (a filter on account or text, or on a reason or code
    /// that may be among the values past the bound): read the store.
    pub fn count(&self, filter: &Filter) -> Option<u64> {
        let p = self.plan(filter)?;
        if p.nothing {
            return Some(0);
        }
        Some(self.rows.iter().filter(|r| p.matches(r)).count() as u64)
    }

    /// The counts of the unresolved dead letters matching `filter`, as a
    /// full read gives them; `None` as for [`Summary::count`].
    pub fn groups(&self, filter: &Filter) -> Option<Groups> {
        let p = self.plan(filter)?;
        let mut total = 0u64;
        let mut body_bytes = 0u64;
        let mut oldest: Option<i64> = None;
        let mut newest: Option<i64> = None;
        let mut exact = true;
        let fields = [&self.reasons, &self.codes, &self.errors, &self.queues];
        let mut counts: Vec<Vec<u64>> = fields.iter().map(|k| vec![0; k.slots.len()]).collect();
        let mut none = [0u64; 4];
        for r in self.rows.iter().filter(|r| p.matches(r)) {
            total += 1;
            body_bytes += u64::from(r.body_bytes);
            if r.failed_at_ms != NO_TIME {
                let t = r.failed_at_ms;
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
                newest = Some(newest.map_or(t, |o| o.max(t)));
            }
            for (i, k) in [r.reason, r.code, r.error, r.queue].into_iter().enumerate() {
                match k {
                    NONE => none[i] += 1,
                    OVER => exact = false,
                    k => counts[i][usize::from(k)] += 1,
                }
            }
        }
        let listed = |i: usize| fields[i].listed(&counts[i], none[i], total);
        Some(Groups {
            total,
            body_bytes,
            by_reason: listed(0),
            by_code: listed(1),
            by_error: listed(2),
            by_queue: listed(3),
            breakdowns_exact: exact,
            oldest_failed_at_ms: oldest,
            newest_failed_at_ms: newest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::ledger::{entries, Action};
    use super::super::stats::{Tally, MAX_KEY_CHARS, OTHER};
    use super::*;

    /// A small deterministic generator (no seed to pass around).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    fn pick(g: &mut Lcg, xs: &[Option<&'static str>]) -> Option<&'static str> {
        xs[g.next(xs.len() as u64) as usize]
    }

    fn letter(g: &mut Lcg) -> (Meta, usize) {
        let reason = pick(
            g,
            &[
                Some("rejected"),
                Some("invalid-message"),
                Some("broker:expired"),
                Some("none"),
                None,
            ],
        );
        let error = pick(g, &[Some("quota"), Some("bad attr"), None]);
        let queue = pick(g, &[Some("imattr.updates"), None]);
        let code = [Some(90033), Some(0), Some(-1), None][g.next(4) as usize];
        let failed_at_ms = [Some(g.next(100) as i64 * 10), None][(g.next(10) == 0) as usize];
        let m = Meta {
            reason: reason.map(Into::into),
            code,
            error: error.map(Into::into),
            source_queue: queue.map(Into::into),
            failed_at_ms,
            ..Meta::default()
        };
        (m, g.next(1000) as usize)
    }

    /// What a full read gives: the letters at or past `first`, unresolved,
    /// matching.
    fn full_read(
        letters: &[(u64, Meta, usize)],
        resolved: &Resolved,
        first: u64,
        f: &Filter,
    ) -> Groups {
        let mut t = Tally::default();
        for (id, m, bytes) in letters {
            if *id >= first && resolved.get(*id).is_none() && f.matches(*id, m, b"") {
                t.add(m, *bytes);
            }
        }
        t.report(10).into()
    }

    fn filters() -> Vec<Filter> {
        let mut out = vec![Filter::default()];
        for r in ["rejected", "broker:expired", "none", "retries-exhausted"] {
            out.push(Filter {
                reason: Some(r.into()),
                ..Filter::default()
            });
        }
        for c in [90033, 0, -1, 7] {
            out.push(Filter {
                code: Some(c),
                ..Filter::default()
            });
        }
        out.push(Filter {
            since_ms: Some(300),
            ..Filter::default()
        });
        out.push(Filter {
            until_ms: Some(500),
            ..Filter::default()
        });
        out.push(Filter {
            reason: Some("rejected".into()),
            code: Some(90033),
            since_ms: Some(100),
            until_ms: Some(800),
            ..Filter::default()
        });
        out.push(Filter {
            ids: Some(vec![40, 3, 3, 999_999, 7, 120]),
            ..Filter::default()
        });
        out.push(Filter {
            ids: Some(Vec::new()),
            ..Filter::default()
        });
        out.push(Filter {
            since_ms: Some(i64::MIN),
            ..Filter::default()
        });
        for b in [0, 1, 60, 2_000, u64::MAX] {
            out.push(Filter {
                before_id: Some(b),
                ..Filter::default()
            });
        }
        out.push(Filter {
            reason: Some("rejected".into()),
            ids: Some(vec![3, 40, 120]),
            before_id: Some(41),
            ..Filter::default()
        });
        out
    }

    fn check(s: &Summary, letters: &[(u64, Meta, usize)], resolved: &Resolved, first: u64) {
        for f in filters() {
            let want = full_read(letters, resolved, first, &f);
            assert_eq!(s.groups(&f).as_ref(), Some(&want), "{f:?}");
            assert_eq!(s.count(&f), Some(want.total), "{f:?}");
        }
    }

    #[test]
    fn rows_are_small() {
        assert!(std::mem::size_of::<Row>() <= 32);
    }

    #[test]
    fn answers_as_a_full_read_while_letters_come_and_go() {
        let mut g = Lcg(7);
        let mut s = Summary::new();
        let mut letters: Vec<(u64, Meta, usize)> = Vec::new();
        let mut resolved = Resolved::default();
        let mut first = 0u64;
        let mut next_id = 0u64;
        for round in 0..20 {
            // New dead letters, with gaps (offsets without one).
            for _ in 0..150 {
                next_id += 1 + g.next(3);
                let (m, bytes) = letter(&mut g);
                s.add(next_id, &m, bytes, 1);
                letters.push((next_id, m, bytes));
            }
            // Read to the end: two offsets without a dead letter.
            next_id += 2;
            s.read_to(next_id);
            // Some resolved: single ids and ranges, old and new.
            let mut ids: Vec<u64> = (0..40).map(|_| g.next(next_id + 1)).collect();
            let lo = g.next(next_id + 1);
            ids.extend(lo..lo + g.next(30));
            ids.sort_unstable();
            ids.dedup();
            let action = if round % 2 == 0 {
                Action::Replayed
            } else {
                Action::Deleted
            };
            for e in entries(action, 1, "test", &ids) {
                resolved.add(&e);
            }
            s.resolve(&resolved);
            // Now and then, retention.
            if round % 5 == 4 {
                first += g.next(200);
                s.drop_below(first);
            }
            check(&s, &letters, &resolved, first);
            assert_eq!(s.upto(), next_id + 1);
        }
        let live = letters
            .iter()
            .filter(|(id, _, _)| *id >= first && resolved.get(*id).is_none())
            .count();
        assert_eq!(s.len(), live);
        assert!(s.len() > 1000 && s.len() < letters.len(), "{}", s.len());
    }

    #[test]
    fn a_letter_read_again_counts_once() {
        let mut s = Summary::new();
        let m = Meta {
            reason: Some("rejected".into()),
            ..Meta::default()
        };
        s.add(5, &m, 1, 1);
        s.add(5, &m, 1, 1);
        s.add(3, &m, 1, 1);
        s.read_to(9);
        s.add(8, &m, 1, 1);
        assert_eq!(s.count(&Filter::default()), Some(1));
        assert_eq!(s.upto(), 10);
        assert_eq!(
            s.tail(),
            Some(Tail {
                id: 5,
                chunk_ms: 1,
                body_bytes: 1
            })
        );
        // Resolved, then read again: still gone.
        let mut r = Resolved::default();
        for e in entries(Action::Replayed, 1, "t", &[5]) {
            r.add(&e);
        }
        s.resolve(&r);
        s.add(5, &m, 1, 1);
        assert_eq!(s.count(&Filter::default()), Some(0));
        assert!(s.is_empty());
        s.reset();
        assert_eq!((s.upto(), s.tail()), (0, None));
    }

    #[test]
    fn account_and_text_filters_are_not_answered() {
        let mut s = Summary::new();
        s.add(0, &Meta::default(), 1, 1);
        for f in [
            Filter {
                account: Some("a".into()),
                ..Filter::default()
            },
            Filter {
                grep: Some("quota".into()),
                ..Filter::default()
            },
        ] {
            assert_eq!(s.count(&f), None);
            assert_eq!(s.groups(&f), None);
        }
        // A reason longer than a key: the cut key cannot tell.
        let long = "r".repeat(MAX_KEY_CHARS + 1);
        let f = Filter {
            reason: Some(long),
            ..Filter::default()
        };
        assert_eq!(s.count(&f), None);
    }

    #[test]
    fn values_past_the_bound_are_counted_under_other() {
        let mut s = Summary::new();
        let mut letters = Vec::new();
        let n = KEY_COUNTERS as u64 + 10;
        for id in 0..n {
            let m = Meta {
                reason: Some(format!("r{id}")),
                code: Some(1),
                ..Meta::default()
            };
            s.add(id, &m, 2, 1);
            letters.push((id, m, 2usize));
        }
        let g = s.groups(&Filter::default()).unwrap();
        assert_eq!(g.total, n);
        assert!(!g.breakdowns_exact);
        assert_eq!(g.by_reason.iter().map(|(_, c)| c).sum::<u64>(), n);
        assert_eq!(g.by_reason.last(), Some(&(OTHER.to_string(), n - 50)));
        assert_eq!(g.by_code, vec![("1".to_string(), n)]);
        assert!(s.reasons.ids.len() <= KEY_COUNTERS);
        let reason = |r: &str| Filter {
            reason: Some(r.into()),
            ..Filter::default()
        };
        assert_eq!(
            s.count(&reason("r3")),
            None,
            "an interned value, while others are under (other)"
        );
        assert_eq!(
            s.count(&reason(&format!("r{}", n - 1))),
            None,
            "maybe under (other)"
        );
        // Once the first values are resolved, their slots take new ones, and
        // what is left under (other) is still counted there.
        let mut r = Resolved::default();
        let ids: Vec<u64> = (0..KEY_COUNTERS as u64).collect();
        for e in entries(Action::Deleted, 1, "t", &ids) {
            r.add(&e);
        }
        s.resolve(&r);
        assert_eq!(s.reasons.ids.len(), 0);
        assert_eq!(s.count(&reason("r3")), None, "(other) rows remain");
        for id in n..n + 5 {
            let m = Meta {
                reason: Some("fresh".into()),
                ..Meta::default()
            };
            s.add(id, &m, 2, 1);
        }
        // A value under (other) that came again into a freed slot: its key
        // alone would say 1 of its 2.
        let again = format!("r{}", n - 1);
        s.add(
            n + 5,
            &Meta {
                reason: Some(again.clone()),
                ..Meta::default()
            },
            2,
            1,
        );
        assert_eq!(
            s.count(&reason(&again)),
            None,
            "one of them is under (other)"
        );
        assert_eq!(s.count(&reason("fresh")), None, "(other) rows remain");
        let g = s.groups(&Filter::default()).unwrap();
        assert_eq!(
            g.by_reason,
            vec![
                ("fresh".to_string(), 5),
                (again.clone(), 1),
                (OTHER.to_string(), 10)
            ]
        );
        // The (other) rows gone, the rows tell every value again.
        s.drop_below(n);
        assert_eq!(s.count(&reason("r3")), Some(0));
        assert_eq!(s.count(&reason("fresh")), Some(5));
        assert_eq!(s.count(&reason(&again)), Some(1));
        let g = s.groups(&Filter::default()).unwrap();
        assert!(g.breakdowns_exact);
        assert_eq!(g.total, 6);
    }

    #[test]
    fn a_missing_value_and_a_literal_none_are_one_group_but_not_one_filter() {
        let mut s = Summary::new();
        let mut letters = Vec::new();
        for (id, reason) in [(0, None), (1, Some("none")), (2, Some("rejected"))] {
            let m = Meta {
                reason: reason.map(Into::into),
                ..Meta::default()
            };
            s.add(id, &m, 0, 1);
            letters.push((id, m, 0usize));
        }
        let g = s.groups(&Filter::default()).unwrap();
        assert_eq!(
            g.by_reason,
            vec![("none".to_string(), 2), ("rejected".to_string(), 1)]
        );
        let f = Filter {
            reason: Some("none".into()),
            ..Filter::default()
        };
        assert_eq!(s.count(&f), Some(1));
        check(&s, &letters, &Resolved::default(), 0);
    }
}
