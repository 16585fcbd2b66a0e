//! `dlq stats`: counts gathered in one pass with memory bounded whatever the
//! queue holds (no I/O here).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use serde::Serialize;

use super::view::{utc_time, Meta};

/// Distinct accounts counted exactly; past that the top list is approximate.
pub(crate) const ACCOUNT_COUNTERS: usize = 10_000;

/// Distinct keys counted per breakdown (reason, error code, source queue):
/// their values come from headers a publisher can set, so their number is
/// bounded like the accounts'.
pub(crate) const KEY_COUNTERS: usize = 1_000;

/// Keys a breakdown shows; the dead letters of the others are summed under
/// [`OTHER`].
pub(crate) const KEYS_SHOWN: usize = 50;

/// The breakdown key that sums the keys not shown.
pub(crate) const OTHER: &str = "(other)";

/// Longest key counted, in characters: a longer one is cut (ending in `…`),
/// so that memory is bounded in bytes, not only in keys.
pub(crate) const MAX_KEY_CHARS: usize = 256;

/// `key`, cut to [`MAX_KEY_CHARS`].
pub(crate) fn bounded_key(key: &str) -> Cow<'_, str> {
    match key.char_indices().nth(MAX_KEY_CHARS - 1) {
        Some((i, _)) if key[i..].chars().nth(1).is_some() => Cow::Owned(format!("{}…", &key[..i])),
        _ => Cow::Borrowed(key),
    }
}

/// The most frequent keys of a stream in bounded memory (Misra–Gries): at
/// most `capacity` counters. While no counter was ever dropped the counts are
/// exact; after that each count is a lower bound, short by at most
/// `total / (capacity + 1)`, and every key more frequent than that is kept.
#[derive(Debug, Clone)]
pub(crate) struct TopK {
    capacity: usize,
    counts: HashMap<String, u64>,
    total: u64,
    exact: bool,
}

impl TopK {
    /// At most `capacity` (≥ 1) counters.
    pub(crate) fn new(capacity: usize) -> TopK {
        TopK {
            capacity: capacity.max(1),
            counts: HashMap::new(),
            total: 0,
            exact: true,
        }
    }

    /// Counts one occurrence of `key` (cut to [`MAX_KEY_CHARS`]).
    pub(crate) fn add(&mut self, key: &str) {
        let key = bounded_key(key);
        self.total += 1;
        if let Some(c) = self.counts.get_mut(key.as_ref()) {
            *c += 1;
        } else if self.counts.len() < self.capacity {
            self.counts.insert(key.into_owned(), 1);
        } else {
            // Full: this key and one of every counter cancel out. Each such
            // step removes `capacity` counts, so it runs at most total/capacity
            // times: constant work per key, amortised.
            self.exact = false;
            self.counts.retain(|_, c| {
                *c -= 1;
                *c > 0
            });
        }
    }

    /// The `n` largest counts, largest first (ties by key).
    pub(crate) fn top(&self, n: usize) -> Vec<(String, u64)> {
        top_of(
            self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect(),
            n,
        )
    }

    /// Whether the counts are exact.
    pub(crate) fn exact(&self) -> bool {
        self.exact
    }

    /// The `n` largest counts as a map, plus [`OTHER`] for what the others
    /// (and the occurrences a full table dropped) add up to, so that the
    /// values always sum to the number of keys counted.
    pub(crate) fn breakdown(&self, n: usize) -> BTreeMap<String, u64> {
        breakdown_of(self.top(n), self.total)
    }

    /// How far below the true count a reported count may be.
    pub(crate) fn max_error(&self) -> u64 {
        if self.exact {
            0
        } else {
            self.total / (self.capacity as u64 + 1)
        }
    }
}

/// The running counts of a read.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    total: u64,
    bytes: u64,
    by_reason: TopK,
    by_code: TopK,
    by_error: TopK,
    by_source_queue: TopK,
    accounts: TopK,
    oldest_ms: Option<i64>,
    newest_ms: Option<i64>,
    replayed_before: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new(ACCOUNT_COUNTERS)
    }
}

/// What `dlq stats` found (`--json` prints it). Each breakdown lists its
/// keys most first, at most [`KEYS_SHOWN`] of them, the dead letters of the
/// others summed under [`OTHER`] (last), so that its counts add up to `total`
/// (for `by_account`: the most frequent accounts only).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// Dead letters counted.
    pub total: u64,
    /// Their bodies' total size, in bytes.
    pub body_bytes: u64,
    /// By reason (`none` when a message says nothing).
    pub by_reason: Vec<(String, u64)>,
    /// By `x-imattr-error-code` (`none` when absent).
    pub by_code: Vec<(String, u64)>,
    /// By error text: identical texts together.
    pub by_error: Vec<(String, u64)>,
    /// By source queue (`none` when absent).
    pub by_queue: Vec<(String, u64)>,
    /// The accounts with the most dead letters, most first.
    pub by_account: Vec<(String, u64)>,
    /// Whether the reason, code, error and queue counts are exact (else
    /// there were more than [`KEY_COUNTERS`] distinct keys and each count is
    /// a lower bound, the difference being in [`OTHER`]).
    pub breakdowns_exact: bool,
    /// Whether `by_account` counts are exact (else each is a lower bound
    /// short by at most `accounts_max_error`).
    pub accounts_exact: bool,
    /// See `accounts_exact`.
    pub accounts_max_error: u64,
    /// Earliest failure time, Unix ms.
    pub oldest_failed_at_ms: Option<i64>,
    /// Latest failure time, Unix ms.
    pub newest_failed_at_ms: Option<i64>,
    /// Dead letters that had been replayed before (`x-imattr-replays` > 0).
    pub replayed_before: u64,
}

/// The `n` largest of `counts`, largest first (ties by key).
fn top_of(mut counts: Vec<(String, u64)>, n: usize) -> Vec<(String, u64)> {
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(n);
    counts
}

/// `top` as a map, plus [`OTHER`] for what the rest of `total` adds up to.
fn breakdown_of(top: Vec<(String, u64)>, total: u64) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for (k, c) in top {
        *m.entry(k).or_default() += c;
    }
    let shown: u64 = m.values().sum();
    if total > shown {
        *m.entry(OTHER.to_string()).or_default() += total - shown;
    }
    m
}

/// Exact `counts` of some of `total` dead letters (the rest under no key) as
/// a breakdown of [`Stats`] lists them: the same keys, order and [`OTHER`].
pub(crate) fn listed_counts(counts: Vec<(String, u64)>, total: u64) -> Vec<(String, u64)> {
    list_of(breakdown_of(top_of(counts, KEYS_SHOWN), total))
}

fn bump(t: &mut TopK, k: Option<&str>) {
    t.add(k.unwrap_or("none"));
}

/// A breakdown as a list, most first, [`OTHER`] last.
fn listed(t: &TopK) -> Vec<(String, u64)> {
    list_of(t.breakdown(KEYS_SHOWN))
}

/// A breakdown's map as a list, most first, [`OTHER`] last.
fn list_of(m: BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = m.into_iter().collect();
    rows.sort_by(|a, b| {
        (a.0 == OTHER)
            .cmp(&(b.0 == OTHER))
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| a.0.cmp(&b.0))
    });
    rows
}

impl Tally {
    /// Counts with at most `account_counters` distinct accounts tracked.
    pub(crate) fn new(account_counters: usize) -> Tally {
        Tally {
            total: 0,
            bytes: 0,
            by_reason: TopK::new(KEY_COUNTERS),
            by_code: TopK::new(KEY_COUNTERS),
            by_error: TopK::new(KEY_COUNTERS),
            by_source_queue: TopK::new(KEY_COUNTERS),
            accounts: TopK::new(account_counters),
            oldest_ms: None,
            newest_ms: None,
            replayed_before: 0,
        }
    }

    /// Counts one dead letter.
    pub(crate) fn add(&mut self, m: &Meta, body_bytes: usize) {
        self.total += 1;
        self.bytes += body_bytes as u64;
        bump(&mut self.by_reason, m.reason.as_deref());
        bump(&mut self.by_code, m.code.map(|c| c.to_string()).as_deref());
        bump(&mut self.by_error, m.error.as_deref());
        bump(&mut self.by_source_queue, m.source_queue.as_deref());
        for a in m.accounts() {
            self.accounts.add(a);
        }
        if let Some(t) = m.failed_at_ms {
            self.oldest_ms = Some(self.oldest_ms.map_or(t, |o| o.min(t)));
            self.newest_ms = Some(self.newest_ms.map_or(t, |o| o.max(t)));
        }
        if m.replays > 0 {
            self.replayed_before += 1;
        }
    }

    /// The report, with the `top` most frequent accounts.
    pub(crate) fn report(&self, top: usize) -> Stats {
        Stats {
            total: self.total,
            body_bytes: self.bytes,
            by_reason: listed(&self.by_reason),
            by_code: listed(&self.by_code),
            by_error: listed(&self.by_error),
            by_queue: listed(&self.by_source_queue),
            by_account: self.accounts.top(top),
            breakdowns_exact: self.by_reason.exact()
                && self.by_code.exact()
                && self.by_error.exact()
                && self.by_source_queue.exact(),
            accounts_exact: self.accounts.exact(),
            accounts_max_error: self.accounts.max_error(),
            oldest_failed_at_ms: self.oldest_ms,
            newest_failed_at_ms: self.newest_ms,
            replayed_before: self.replayed_before,
        }
    }
}

/// One grouping of `dlq stats --by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// Identical error texts together.
    Error,
    /// By reason.
    Reason,
    /// By error code.
    Code,
    /// By account (the most frequent).
    Account,
    /// By source queue.
    Queue,
}

impl By {
    fn title(self) -> &'static str {
        match self {
            By::Error => "error",
            By::Reason => "reason",
            By::Code => "error code",
            By::Account => "account",
            By::Queue => "source queue",
        }
    }
}

impl Stats {
    /// One grouping.
    pub fn by(&self, by: By) -> &[(String, u64)] {
        match by {
            By::Error => &self.by_error,
            By::Reason => &self.by_reason,
            By::Code => &self.by_code,
            By::Account => &self.by_account,
            By::Queue => &self.by_queue,
        }
    }

    /// Prints the report for a person: every grouping, or only `only`.
    pub(crate) fn print(
        &self,
        out: &mut impl Write,
        queue: &str,
        only: Option<By>,
    ) -> std::io::Result<()> {
        writeln!(
            out,
            "{queue}: {} dead letters, {} body bytes",
            self.total, self.body_bytes
        )?;
        let when = |t: Option<i64>| t.map(utc_time).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "failed between {} and {}",
            when(self.oldest_failed_at_ms),
            when(self.newest_failed_at_ms)
        )?;
        if self.replayed_before > 0 {
            writeln!(out, "replayed before: {}", self.replayed_before)?;
        }
        if !self.breakdowns_exact {
            writeln!(
                out,
                "too many distinct keys to count exactly: counts below are lower bounds, \
                 the rest is under {OTHER}"
            )?;
        }
        let groups = match only {
            Some(b) => vec![b],
            None => vec![By::Reason, By::Code, By::Error, By::Queue, By::Account],
        };
        for b in groups {
            let rows = self.by(b);
            if b == By::Account {
                if rows.is_empty() {
                    continue;
                }
                let note = if self.accounts_exact {
                    String::new()
                } else {
                    format!(
                        " (too many accounts to count exactly: each count may be up to {} low)",
                        self.accounts_max_error
                    )
                };
                writeln!(out, "\ntop accounts{note}:")?;
            } else {
                writeln!(out, "\nby {}:", b.title())?;
            }
            for (k, n) in rows {
                writeln!(out, "  {n:>10}  {k}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(rows: &[(String, u64)], k: &str) -> u64 {
        rows.iter().find(|(x, _)| x == k).map_or(0, |(_, n)| *n)
    }

    #[test]
    fn topk_is_exact_while_it_fits() {
        let mut t = TopK::new(3);
        for k in ["a", "b", "a", "c", "a", "b"] {
            t.add(k);
        }
        assert!(t.exact());
        assert_eq!(t.max_error(), 0);
        assert_eq!(t.top(2), vec![("a".to_string(), 3), ("b".to_string(), 2)]);
    }

    #[test]
    fn topk_keeps_heavy_hitters_in_bounded_memory() {
        // 100 heavy accounts among 100,000 one-off ones, 50 counters.
        let mut t = TopK::new(50);
        let mut n = 0u64;
        for i in 0..100_000u64 {
            t.add(&format!("once{i}"));
            n += 1;
            if i % 1000 == 0 {
                for h in 0..10 {
                    for _ in 0..(h + 1) * 20 {
                        t.add(&format!("heavy{h}"));
                        n += 1;
                    }
                }
            }
            assert!(t.counts.len() <= 50);
        }
        assert!(!t.exact());
        assert_eq!(t.max_error(), n / 51);
        let top = t.top(3);
        assert_eq!(
            top.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["heavy9", "heavy8", "heavy7"]
        );
        // Lower bounds within the error.
        let truth = 200 * 100;
        assert!(top[0].1 <= truth && top[0].1 + t.max_error() >= truth);
    }

    #[test]
    fn breakdowns_are_bounded_whatever_the_headers_hold() {
        // Broker-made dead letters carry headers a publisher can set: a
        // distinct reason, code and source queue each (long ones too), and
        // a few frequent ones among them.
        let mut s = Tally::new(10);
        let long = "q".repeat(10_000);
        let n = 50_000u64;
        for i in 0..n {
            let m = if i % 10 == 0 {
                Meta {
                    reason: Some("rejected".into()),
                    code: Some(90033),
                    source_queue: Some("imattr.updates".into()),
                    ..Meta::default()
                }
            } else {
                Meta {
                    reason: Some(format!("broker:r{i}")),
                    code: Some(i as i64),
                    source_queue: Some(format!("{i}{long}")),
                    ..Meta::default()
                }
            };
            s.add(&m, 0);
            for t in [&s.by_reason, &s.by_code, &s.by_source_queue] {
                assert!(t.counts.len() <= KEY_COUNTERS);
            }
            if i % 1000 == 999 {
                let long_keys = s.by_source_queue.counts.keys();
                assert!(
                    long_keys.map(|k| k.len()).sum::<usize>() <= KEY_COUNTERS * MAX_KEY_CHARS * 4
                );
            }
        }
        let r = s.report(10);
        assert!(!r.breakdowns_exact);
        for (m, heavy) in [
            (&r.by_reason, "rejected"),
            (&r.by_code, "90033"),
            (&r.by_queue, "imattr.updates"),
        ] {
            assert!(m.len() <= KEYS_SHOWN + 1, "{}", m.len());
            assert_eq!(
                m.iter().map(|(_, c)| c).sum::<u64>(),
                n,
                "every dead letter counted once"
            );
            // The frequent key is kept, its count a lower bound within the error.
            let c = get(m, heavy);
            assert!(
                c <= n / 10 && c + n / (KEY_COUNTERS as u64 + 1) >= n / 10,
                "{c}"
            );
            assert!(get(m, OTHER) > 0);
            assert_eq!(m.last().map(|(k, _)| k.as_str()), Some(OTHER));
        }

        // A few keys: exact, no (other).
        let mut s = Tally::new(10);
        for r in ["a", "b", "a"] {
            s.add(
                &Meta {
                    reason: Some(r.into()),
                    ..Meta::default()
                },
                0,
            );
        }
        let r = s.report(10);
        assert!(r.breakdowns_exact);
        assert_eq!(r.by_reason, vec![("a".into(), 2), ("b".into(), 1)]);
        assert_eq!(
            bounded_key(&"é".repeat(MAX_KEY_CHARS)),
            "é".repeat(MAX_KEY_CHARS)
        );
        assert_eq!(
            bounded_key(&"é".repeat(MAX_KEY_CHARS + 1)),
            format!("{}…", "é".repeat(MAX_KEY_CHARS - 1))
        );
    }

    #[test]
    fn counts_reasons_codes_queues_times_and_accounts() {
        let mut s = Tally::new(10);
        let m = |reason: &str, code: Option<i64>, acc: &str, at: i64| Meta {
            reason: Some(reason.into()),
            code,
            account: Some(acc.into()),
            failed_at_ms: Some(at),
            source_queue: Some("q".into()),
            ..Meta::default()
        };
        s.add(&m("rejected", Some(90033), "a", 30), 10);
        s.add(&m("rejected", Some(90033), "a", 10), 5);
        s.add(&m("broker:expired", None, "b", 20), 1);
        s.add(
            &Meta {
                failed_accounts: vec!["c".into(), "a".into()],
                account: Some("ignored".into()),
                replays: 2,
                ..Meta::default()
            },
            4,
        );
        let r = s.report(2);
        assert_eq!(r.total, 4);
        assert_eq!(r.body_bytes, 20);
        assert_eq!(get(&r.by_reason, "rejected"), 2);
        assert_eq!(get(&r.by_reason, "broker:expired"), 1);
        assert_eq!(get(&r.by_reason, "none"), 1);
        assert_eq!(get(&r.by_code, "90033"), 2);
        assert_eq!(get(&r.by_code, "none"), 2);
        assert_eq!(get(&r.by_queue, "q"), 3);
        assert_eq!(r.oldest_failed_at_ms, Some(10));
        assert_eq!(r.newest_failed_at_ms, Some(30));
        assert_eq!(r.replayed_before, 1);
        assert!(r.accounts_exact);
        assert_eq!(r.by_account, vec![("a".into(), 3), ("b".into(), 1)]);
        let mut out = Vec::new();
        r.print(&mut out, "dead", None).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("dead: 4 dead letters, 20 body bytes"),
            "{text}"
        );
        assert!(text.contains("broker:expired"), "{text}");
        let mut out = Vec::new();
        r.print(&mut out, "dead", Some(By::Error)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("by error:"), "{text}");
        assert!(!text.contains("by reason:"), "{text}");
    }

    #[test]
    fn by_error_groups_identical_texts() {
        let mut s = Tally::new(10);
        for e in ["quota", "bad attr", "quota", "quota", "bad attr", "other"] {
            s.add(
                &Meta {
                    error: Some(e.into()),
                    ..Meta::default()
                },
                0,
            );
        }
        let r = s.report(10);
        assert_eq!(
            r.by(By::Error),
            [
                ("quota".to_string(), 3),
                ("bad attr".to_string(), 2),
                ("other".to_string(), 1)
            ]
        );
    }
}
