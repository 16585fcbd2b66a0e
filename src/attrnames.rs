//! The app's attribute names (docs/messages.md): fixed by configuration, or read
//! from the API at start and every 5 minutes. Updates naming another
//! attribute are invalid; while the names are unknown nothing is checked.
//! Either way the first answer also tells the worker's readiness that the
//! API accepts its credentials (docs/metrics.md).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::health::Health;
use crate::tencent::Client;
use crate::wait::{backoff_forever, sleep_unless_cancelled};

/// How often the attribute names are read again.
const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// After a failed read, the next one comes this soon, doubling up to a minute.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The app's attribute names, when known. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub(crate) struct AttrNames(Arc<RwLock<Option<Arc<HashSet<String>>>>>);

impl AttrNames {
    /// Fixed names. A task asks the API once (`im_get_attr_name`), retrying
    /// with backoff until it answers, so that `/readyz` tells a deployment
    /// whose credentials the API refuses before any update does.
    pub(crate) fn fixed(
        names: &[String],
        client: &Client,
        health: &Arc<Health>,
        cancel: &CancellationToken,
    ) -> Self {
        let n = AttrNames::default();
        n.set(Some(names.iter().cloned().collect()));
        let (c, h, stop) = (client.clone(), health.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut retry = backoff_forever(RETRY_FIRST, RETRY_MAX);
            let mut failures = 0u32;
            // A batch that succeeded meanwhile has shown the same.
            while !h.has_api_answered() {
                match c.probe_attr_names().await {
                    Ok(_) => h.api_answered(),
                    Err(e) => {
                        // Once per episode; /readyz says it all along.
                        if failures == 0 {
                            warn!(error = %e, "The API refuses a first request; not ready until it accepts one");
                        } else {
                            debug!(error = %e, failures, "The API still refuses the first request");
                        }
                        failures += 1;
                        h.api_failing(e.to_string());
                        let wait = retry.next_backoff().unwrap_or(RETRY_MAX);
                        if !sleep_unless_cancelled(wait, &stop).await {
                            return;
                        }
                    }
                }
            }
        });
        n
    }

    /// Names read from the API now and then every 5 minutes (sooner, with
    /// backoff, after a failure) until `cancel`; None when cancelled before
    /// the first read finished.
    pub(crate) async fn from_api(
        client: &Client,
        health: &Arc<Health>,
        cancel: &CancellationToken,
    ) -> Option<Self> {
        let names = AttrNames::default();
        let mut ok = tokio::select! {
            r = names.refresh(client, health) => r,
            _ = cancel.cancelled() => return None,
        };
        let (n, c, h, stop) = (
            names.clone(),
            client.clone(),
            health.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let mut retry = backoff_forever(RETRY_FIRST, RETRY_MAX);
            let mut failures = u32::from(!ok);
            loop {
                let wait = if ok {
                    retry.reset();
                    REFRESH_EVERY
                } else {
                    retry.next_backoff().unwrap_or(RETRY_MAX)
                };
                if !sleep_unless_cancelled(wait, &stop).await {
                    return;
                }
                ok = n.refresh_quietly(&c, &h, failures > 0).await;
                failures = if ok { 0 } else { failures + 1 };
            }
        });
        Some(names)
    }

    /// The current set (None: not known, check nothing).
    pub(crate) fn get(&self) -> Option<Arc<HashSet<String>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, names: Option<HashSet<String>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names.map(Arc::new);
    }

    /// Asks the API; on failure warns and keeps what it had (nothing, at
    /// start). Tells `health` whether the API answered; true if it did.
    pub(crate) async fn refresh(&self, client: &Client, health: &Health) -> bool {
        self.refresh_quietly(client, health, false).await
    }

    /// [`AttrNames::refresh`], logging a failure at DEBUG when `again`: the
    /// WARN of the first failure in a row said it already.
    async fn refresh_quietly(&self, client: &Client, health: &Health, again: bool) -> bool {
        match client.get_attr_names().await {
            Ok(m) if m.is_empty() => {
                health.api_answered();
                warn!("The app has no attribute names registered; not checking names locally");
                self.set(None);
                true
            }
            Ok(m) => {
                health.api_answered();
                let names: HashSet<String> = m.into_values().collect();
                debug!(count = names.len(), "Attribute names loaded");
                self.set(Some(names));
                true
            }
            Err(e) => {
                // Names kept from an earlier answer may be stale (renamed or
                // added since): refusing updates on them would dead-letter
                // valid ones, so check nothing until the API answers again.
                if again {
                    debug!(error = %e, "Still cannot read the app's attribute names");
                } else {
                    warn!(error = %e, "Cannot read the app's attribute names; not checking names locally until it works");
                }
                health.api_failing(format!("cannot read the app's attribute names: {e}"));
                self.set(None);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::simulator::{SimOptions, Simulator};
    use crate::tencent::Signer;

    /// A failed refresh forgets the names it had: they may be stale.
    #[tokio::test]
    async fn a_failed_refresh_clears_the_names() {
        let mut sim = Simulator::start(SimOptions {
            attr_names: vec!["sex".into()],
            ..Default::default()
        })
        .await
        .expect("simulator starts");
        let signer = Signer::from_key(
            Secret::new(sim.secret_key()),
            sim.sdkappid(),
            "administrator",
            86400,
        );
        let client = Client::new(&sim.url(), Arc::new(signer), Duration::from_secs(2), 100, 1)
            .expect("client");
        let names = AttrNames::default();
        let health = Health::default();
        assert!(names.refresh(&client, &health).await);
        let known = names.get().expect("names read from the API");
        assert!(known.contains("sex"));
        assert!(health.has_api_answered());
        sim.pause().await;
        assert!(!names.refresh(&client, &health).await);
        assert!(
            names.get().is_none(),
            "stale names kept after a failed refresh"
        );
    }

    /// The names read at start are read again every 5 minutes (on paused
    /// time): a name registered meanwhile is known from the next read on.
    #[tokio::test(start_paused = true)]
    async fn names_are_read_again_every_five_minutes() {
        let sim = Simulator::start(SimOptions {
            attr_names: vec!["sex".into()],
            ..Default::default()
        })
        .await
        .expect("simulator starts");
        let signer = Signer::from_key(
            Secret::new(sim.secret_key()),
            sim.sdkappid(),
            "administrator",
            86400,
        );
        // A timeout no jump of the paused clock reaches while a request is
        // on its way.
        let timeout = Duration::from_secs(3600);
        let client = Client::new(&sim.url(), Arc::new(signer), timeout, 100, 1).expect("client");
        let cancel = CancellationToken::new();
        let health = Arc::new(Health::default());
        let names = AttrNames::from_api(&client, &health, &cancel)
            .await
            .expect("not cancelled");
        let known = |n: &AttrNames| {
            let mut v: Vec<String> = n
                .get()
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(known(&names), ["sex"]);
        let r = client
            .call(
                "im_set_attr_name",
                br#"{"AttrNames":{"1":"city"}}"#.to_vec(),
            )
            .await;
        assert_eq!(r.class, crate::tencent::Class::Success, "{:?}", r.reply);
        tokio::time::sleep(REFRESH_EVERY - Duration::from_secs(1)).await;
        assert_eq!(known(&names), ["sex"], "read again too early");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while known(&names) != ["city", "sex"] && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(known(&names), ["city", "sex"], "not read again");
        cancel.cancel();
    }

    /// A failed first read is tried again within a minute, not after five
    /// (on paused time), and the worker is ready once the API answered.
    #[tokio::test(start_paused = true)]
    async fn a_failed_read_is_tried_again_within_a_minute() {
        let mut sim = Simulator::start(SimOptions {
            attr_names: vec!["sex".into()],
            ..Default::default()
        })
        .await
        .expect("simulator starts");
        sim.update_faults(|f| f.misconfigured = true);
        let signer = Signer::from_key(
            Secret::new(sim.secret_key()),
            sim.sdkappid(),
            "administrator",
            86400,
        );
        let client = Client::new(
            &sim.url(),
            Arc::new(signer),
            Duration::from_secs(3600),
            100,
            1,
        )
        .expect("client");
        let cancel = CancellationToken::new();
        let health = Arc::new(Health::default());
        let names = AttrNames::from_api(&client, &health, &cancel)
            .await
            .expect("not cancelled");
        assert!(names.get().is_none());
        assert!(!health.has_api_answered());
        sim.update_faults(|f| f.misconfigured = false);
        let deadline = tokio::time::Instant::now() + RETRY_MAX;
        while !health.has_api_answered() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(health.has_api_answered(), "not read again within a minute");
        assert!(names.get().is_some_and(|n| n.contains("sex")));
        cancel.cancel();
        sim.pause().await;
    }
}
