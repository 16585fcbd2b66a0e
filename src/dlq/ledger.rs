//! The ledger: what `replay`, `delete` and `purge` resolved, appended to a
//! second stream (`<dlq>.ledger`) as ranges of offsets. The store itself is
//! never changed; a dead letter whose offset the ledger names is resolved,
//! the way Kafka Connect's dead-letter topics plus consumer offsets work.
//! Everything but reading and appending the stream is here, without I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The ledger stream of `dlq`.
pub(crate) fn ledger_name(dlq: &str) -> String {
    format!("{dlq}.ledger")
}

/// Ranges per ledger entry: a big delete becomes several entries of a
/// bounded size (about 25 bytes a range in JSON).
pub(crate) const RANGES_PER_ENTRY: usize = 4096;

/// How a dead letter was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    /// Republished to the updates exchange (confirmed).
    Replayed,
    /// Deleted by `dlq delete` or `dlq purge`.
    Deleted,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Replayed => "replayed",
            Action::Deleted => "deleted",
        }
    }
}

/// One ledger message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// What happened to them.
    pub(crate) action: Action,
    /// When, Unix milliseconds.
    pub(crate) at_ms: i64,
    /// Who (the command, or the console's user).
    #[serde(default)]
    pub(crate) by: String,
    /// Inclusive offset ranges, ascending.
    pub(crate) ranges: Vec<(u64, u64)>,
}

/// Whether `body` is a JSON object with the fields of an [`Entry`]: one
/// this version cannot read (an action it does not know) rather than
/// something else published to the ledger.
pub(crate) fn looks_like_entry(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("action").is_some() && v.get("ranges").is_some())
}

/// Sorted offsets as inclusive ranges of consecutive ones.
pub(crate) fn ranges_of(offsets: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &o in offsets {
        match out.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(o) => *end = o,
            Some((_, end)) if *end == o => {}
            _ => out.push((o, o)),
        }
    }
    out
}

/// The entries that record `offsets` (sorted), each of at most
/// [`RANGES_PER_ENTRY`] ranges.
pub(crate) fn entries(action: Action, at_ms: i64, by: &str, offsets: &[u64]) -> Vec<Entry> {
    ranges_of(offsets)
        .chunks(RANGES_PER_ENTRY)
        .map(|r| Entry {
            action,
            at_ms,
            by: by.to_string(),
            ranges: r.to_vec(),
        })
        .collect()
}

/// A resolved span of offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// Last offset, inclusive.
    pub(crate) end: u64,
    /// How.
    pub(crate) action: Action,
    /// When (the latest entry merged into it).
    pub(crate) at_ms: i64,
}

/// Every resolved offset, as merged spans: memory grows with the number of
/// gaps, not of dead letters (a replay of a million in order is one span).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    spans: BTreeMap<u64, Span>,
}

impl Resolved {
    /// Adds a ledger entry. An offset already resolved keeps its first
    /// resolution (a duplicate entry changes nothing).
    pub(crate) fn add(&mut self, e: &Entry) {
        for &(a, b) in &e.ranges {
            if a <= b {
                self.insert(a, b, e.action, e.at_ms);
            }
        }
    }

    /// How `offset` was resolved, if it was.
    pub(crate) fn get(&self, offset: u64) -> Option<&Span> {
        self.spans
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| s.end >= offset)
    }

    /// The resolved offsets as inclusive ranges, ascending.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.spans.iter().map(|(a, s)| (*a, s.end))
    }

    /// Spans held (the memory cost).
    pub(crate) fn spans(&self) -> usize {
        self.spans.len()
    }

    fn insert(&mut self, a: u64, b: u64, action: Action, at_ms: i64) {
        let mut cur = a;
        loop {
            if let Some(s) = self.get(cur) {
                if s.end >= b {
                    return;
                }
                cur = s.end + 1;
                continue;
            }
            let next = self.spans.range(cur..).next().map(|(s, _)| *s);
            let end = match next {
                Some(n) if n <= b => n - 1,
                _ => b,
            };
            self.put(cur, end, action, at_ms);
            if end >= b {
                return;
            }
            cur = end + 1;
        }
    }

    /// Adds an uncovered piece, merged with same-action neighbours.
    fn put(&mut self, mut a: u64, mut b: u64, action: Action, mut at_ms: i64) {
        if let Some((&s, left)) = self.spans.range(..a).next_back() {
            if left.action == action && left.end.checked_add(1) == Some(a) {
                a = s;
                at_ms = at_ms.max(left.at_ms);
                self.spans.remove(&s);
            }
        }
        if let Some(n) = b.checked_add(1) {
            if let Some(right) = self.spans.get(&n).copied() {
                if right.action == action {
                    b = right.end;
                    at_ms = at_ms.max(right.at_ms);
                    self.spans.remove(&n);
                }
            }
        }
        self.spans.insert(
            a,
            Span {
                end: b,
                action,
                at_ms,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(action: Action, at_ms: i64, ranges: &[(u64, u64)]) -> Entry {
        Entry {
            action,
            at_ms,
            by: "t".into(),
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn what_looks_like_an_entry() {
        assert!(looks_like_entry(
            br#"{"action":"archived","at_ms":1,"ranges":[[1,2]]}"#
        ));
        assert!(!looks_like_entry(b"hello"));
        assert!(!looks_like_entry(br#"{"action":"x"}"#));
        assert!(!looks_like_entry(br#"[1,2]"#));
    }

    #[test]
    fn offsets_become_ranges() {
        assert_eq!(ranges_of(&[]), vec![]);
        assert_eq!(ranges_of(&[1, 2, 3, 5, 7, 8]), vec![(1, 3), (5, 5), (7, 8)]);
        assert_eq!(ranges_of(&[4, 4, 5]), vec![(4, 5)]);
        assert_eq!(
            ranges_of(&[u64::MAX - 1, u64::MAX]),
            vec![(u64::MAX - 1, u64::MAX)]
        );
        let many: Vec<u64> = (0..(RANGES_PER_ENTRY as u64 * 2 + 1))
            .map(|i| i * 2)
            .collect();
        let es = entries(Action::Deleted, 1, "x", &many);
        assert_eq!(es.len(), 3);
        assert_eq!(es.iter().map(|e| e.ranges.len()).sum::<usize>(), many.len());
    }

    #[test]
    fn spans_merge_and_answer_lookups() {
        let mut r = Resolved::default();
        r.add(&e(Action::Replayed, 10, &[(0, 9)]));
        r.add(&e(Action::Replayed, 20, &[(10, 19)]));
        assert_eq!(r.spans(), 1, "adjacent replays are one span");
        assert_eq!(
            r.get(15).map(|s| (s.action, s.at_ms)),
            Some((Action::Replayed, 20))
        );
        r.add(&e(Action::Deleted, 30, &[(20, 20), (22, 25)]));
        assert_eq!(r.spans(), 3);
        assert_eq!(r.get(20).map(|s| s.action), Some(Action::Deleted));
        assert_eq!(r.get(21), None);
        assert_eq!(r.get(26), None);
        r.add(&e(Action::Deleted, 40, &[(21, 21)]));
        assert_eq!(r.spans(), 2, "the gap closed: 20..=25 is one span");
        assert_eq!(r.get(23).map(|s| s.at_ms), Some(40));
    }

    #[test]
    fn a_resolved_offset_keeps_its_first_resolution() {
        let mut r = Resolved::default();
        r.add(&e(Action::Replayed, 1, &[(5, 6)]));
        r.add(&e(Action::Deleted, 2, &[(0, 10)]));
        assert_eq!(r.get(5).map(|s| s.action), Some(Action::Replayed));
        assert_eq!(r.get(6).map(|s| s.action), Some(Action::Replayed));
        assert_eq!(r.get(4).map(|s| s.action), Some(Action::Deleted));
        assert_eq!(r.get(7).map(|s| s.action), Some(Action::Deleted));
        assert_eq!(r.get(11), None);
        let again = r.clone();
        r.add(&e(Action::Deleted, 3, &[(0, 10)]));
        assert_eq!(r, again, "a duplicate entry changes nothing");
    }

    #[test]
    fn memory_is_spans_not_offsets() {
        let mut r = Resolved::default();
        for i in 0..1_000u64 {
            r.add(&e(Action::Replayed, 1, &[(i * 1000, i * 1000 + 999)]));
        }
        assert_eq!(r.spans(), 1);
        assert!(r.get(999_999).is_some());
        assert!(r.get(1_000_000).is_none());
    }

    #[test]
    fn entries_round_trip_as_json() {
        let x = e(Action::Deleted, 5, &[(1, 2)]);
        let j = serde_json::to_string(&x).unwrap();
        assert!(j.contains("\"deleted\""), "{j}");
        assert_eq!(serde_json::from_str::<Entry>(&j).unwrap(), x);
    }
}
