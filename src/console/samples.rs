//! The overview's history: every few seconds, one reading of the worker's
//! metrics (parsed from the very text `/metrics` serves, so that the two
//! agree) and of the updates queue's depth, kept for 15 minutes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How often a reading is taken.
pub const EVERY: Duration = Duration::from_secs(2);
/// How long readings are kept.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Readings kept: the window, and one more for the first rate.
pub const CAPACITY: usize = (WINDOW.as_secs() / EVERY.as_secs()) as usize + 1;

/// One reading. Counters are totals since the worker started (rates come
/// from two readings); gauges are values at the time.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Reading {
    /// When, Unix milliseconds.
    pub t_ms: i64,
    /// `imattr_messages_acked_total`: updates applied.
    pub acked: f64,
    /// `imattr_api_requests_total`, every class and code.
    pub requests: f64,
    /// `imattr_rate_limited_total`: answers 60007 (refused for the rate).
    pub refused: f64,
    /// `imattr_retries_total`.
    pub retries: f64,
    /// `imattr_rate_limit_current`: the rate allowed now, requests per second.
    pub rate_allowed: f64,
    /// `imattr_pending_accounts`.
    pub pending_accounts: f64,
    /// `imattr_in_flight_requests`.
    pub in_flight: f64,
    /// `imattr_messages_dead_lettered_total`, by reason.
    pub dead_lettered: BTreeMap<String, f64>,
    /// Messages ready in the updates queue (None: the broker did not answer).
    pub queue_ready: Option<u64>,
    /// Messages delivered to this worker and not yet acknowledged (None: no
    /// worker in this process).
    pub queue_unacked: Option<u64>,
    /// Consumers of the updates queue (workers, active and standby).
    pub consumers: Option<u64>,
}

impl Reading {
    /// The metrics part of a reading from the Prometheus text of `/metrics`.
    pub fn from_prometheus(text: &str, t_ms: i64) -> Reading {
        let samples = parse(text);
        let sum = |name: &str| -> f64 {
            samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| s.value)
                .sum()
        };
        let mut dead_lettered = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == "imattr_messages_dead_lettered_total")
        {
            let reason = s.label("reason").unwrap_or("unknown").to_string();
            *dead_lettered.entry(reason).or_insert(0.0) += s.value;
        }
        Reading {
            t_ms,
            acked: sum("imattr_messages_acked_total"),
            requests: sum("imattr_api_requests_total"),
            refused: sum("imattr_rate_limited_total"),
            retries: sum("imattr_retries_total"),
            rate_allowed: sum("imattr_rate_limit_current"),
            pending_accounts: sum("imattr_pending_accounts"),
            in_flight: sum("imattr_in_flight_requests"),
            dead_lettered,
            ..Reading::default()
        }
    }
}

/// One line of the Prometheus text format.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition (comments and lines it cannot
/// read are skipped).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        // Label values are quoted, with \" \\ \n escapes.
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let mut value = String::new();
        let mut in_value = false;
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if in_value {
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => {
                        labels.push((
                            std::mem::take(&mut key).trim().to_string(),
                            std::mem::take(&mut value),
                        ));
                        in_value = false;
                    }
                    c => value.push(c),
                }
            } else {
                match c {
                    '}' => {
                        end = Some(i);
                        break;
                    }
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        in_value = true;
                    }
                    ',' => {}
                    c => key.push(c),
                }
            }
        }
        rest = &inner[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The last [`WINDOW`] of readings.
#[derive(Debug, Default)]
pub struct History {
    readings: Mutex<VecDeque<Reading>>,
}

impl History {
    /// Adds a reading, dropping the oldest past [`CAPACITY`].
    pub fn push(&self, r: Reading) {
        let mut q = lock(&self.readings);
        if q.len() >= CAPACITY {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// The readings, oldest first.
    pub fn snapshot(&self) -> Vec<Reading> {
        lock(&self.readings).iter().cloned().collect()
    }
}

/// The series the overview's charts draw, one point per reading after the
/// first (rates need two readings).
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Series {
    /// When, Unix milliseconds.
    pub t_ms: Vec<i64>,
    /// Updates applied per second.
    pub applied_per_sec: Vec<f64>,
    /// Requests per second, every answer.
    pub requests_per_sec: Vec<f64>,
    /// Requests refused for their rate (60007) per second.
    pub refused_per_sec: Vec<f64>,
    /// Retries per second.
    pub retries_per_sec: Vec<f64>,
    /// The rate allowed, requests per second.
    pub rate_allowed: Vec<f64>,
    /// Accounts pending.
    pub pending_accounts: Vec<f64>,
    /// Requests in flight.
    pub in_flight: Vec<f64>,
    /// Updates queue: ready.
    pub queue_ready: Vec<Option<u64>>,
    /// Updates queue: delivered, not acknowledged.
    pub queue_unacked: Vec<Option<u64>>,
    /// Dead letters per second, by reason.
    pub dead_lettered_per_sec: BTreeMap<String, Vec<f64>>,
}

impl Series {
    /// Rates between consecutive readings; a counter that went down (a
    /// restarted worker) counts from zero.
    pub fn from_readings(readings: &[Reading]) -> Series {
        let mut s = Series::default();
        let reasons: std::collections::BTreeSet<&String> = readings
            .iter()
            .flat_map(|r| r.dead_lettered.keys())
            .collect();
        for pair in readings.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let secs = ((b.t_ms - a.t_ms) as f64 / 1000.0).max(0.001);
            let rate = |x: f64, y: f64| {
                let d = if y >= x { y - x } else { y };
                d / secs
            };
            s.t_ms.push(b.t_ms);
            s.applied_per_sec.push(rate(a.acked, b.acked));
            s.requests_per_sec.push(rate(a.requests, b.requests));
            s.refused_per_sec.push(rate(a.refused, b.refused));
            s.retries_per_sec.push(rate(a.retries, b.retries));
            s.rate_allowed.push(b.rate_allowed);
            s.pending_accounts.push(b.pending_accounts);
            s.in_flight.push(b.in_flight);
            s.queue_ready.push(b.queue_ready);
            s.queue_unacked.push(b.queue_unacked);
            for reason in &reasons {
                let x = a.dead_lettered.get(*reason).copied().unwrap_or(0.0);
                let y = b.dead_lettered.get(*reason).copied().unwrap_or(0.0);
                s.dead_lettered_per_sec
                    .entry((*reason).clone())
                    .or_default()
                    .push(rate(x, y));
            }
        }
        s
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP imattr_messages_acked_total Messages acknowledged.
# TYPE imattr_messages_acked_total counter
imattr_messages_acked_total 120
imattr_api_requests_total{class="success",code="0"} 10
imattr_api_requests_total{class="rate_limited",code="60007"} 3
imattr_rate_limited_total 3
imattr_retries_total 4
imattr_rate_limit_current 87.5
imattr_pending_accounts 7
imattr_in_flight_requests 2
imattr_messages_dead_lettered_total{reason="rejected"} 5
imattr_messages_dead_lettered_total{reason="invalid-message"} 1
imattr_api_request_duration_seconds_bucket{le="+Inf"} 13
weird{a="x\"y,z}",b="2"} 1e3
"#;

    #[test]
    fn reads_what_metrics_serves() {
        let r = Reading::from_prometheus(TEXT, 1000);
        assert_eq!(r.acked, 120.0);
        assert_eq!(r.requests, 13.0);
        assert_eq!(r.refused, 3.0);
        assert_eq!(r.retries, 4.0);
        assert_eq!(r.rate_allowed, 87.5);
        assert_eq!(r.pending_accounts, 7.0);
        assert_eq!(r.in_flight, 2.0);
        assert_eq!(r.dead_lettered["rejected"], 5.0);
        assert_eq!(r.dead_lettered["invalid-message"], 1.0);
        let weird = parse(TEXT).into_iter().find(|s| s.name == "weird").unwrap();
        assert_eq!(weird.label("a"), Some("x\"y,z}"));
        assert_eq!(weird.label("b"), Some("2"));
        assert_eq!(weird.value, 1000.0);
    }

    #[test]
    fn rates_from_consecutive_readings() {
        let mut a = Reading::from_prometheus(TEXT, 0);
        a.queue_ready = Some(50);
        let mut b = a.clone();
        b.t_ms = 2000;
        b.acked += 100.0;
        b.requests += 4.0;
        b.dead_lettered.insert("rejected".into(), 9.0);
        b.dead_lettered.insert("retries-exhausted".into(), 2.0);
        b.queue_ready = Some(10);
        let mut c = b.clone();
        c.t_ms = 4000;
        c.acked = 10.0; // restarted worker: counts from zero
        let s = Series::from_readings(&[a, b, c]);
        assert_eq!(s.t_ms, vec![2000, 4000]);
        assert_eq!(s.applied_per_sec, vec![50.0, 5.0]);
        assert_eq!(s.requests_per_sec, vec![2.0, 0.0]);
        assert_eq!(s.dead_lettered_per_sec["rejected"], vec![2.0, 0.0]);
        assert_eq!(s.dead_lettered_per_sec["retries-exhausted"], vec![1.0, 0.0]);
        assert_eq!(s.queue_ready, vec![Some(10), Some(10)]);
    }

    #[test]
    fn the_history_keeps_fifteen_minutes() {
        let h = History::default();
        for i in 0..CAPACITY + 10 {
            h.push(Reading {
                t_ms: i as i64,
                ..Reading::default()
            });
        }
        let s = h.snapshot();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].t_ms, 10);
        assert_eq!(CAPACITY, 451);
    }
}
