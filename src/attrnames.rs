//! The app's attribute names (docs/messages.md): fixed by configuration, or read
//! from the API at start and every 5 minutes. Updates naming another
//! attribute are invalid; while the names are unknown nothing is checked.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::tencent::Client;

/// How often the attribute names are read again.
const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// The app's attribute names, when known. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub(crate) struct AttrNames(Arc<RwLock<Option<Arc<HashSet<String>>>>>);

impl AttrNames {
    /// Fixed names.
    pub(crate) fn fixed(names: &[String]) -> Self {
        let n = AttrNames::default();
        n.set(Some(names.iter().cloned().collect()));
        n
    }

    /// Names read from the API now and then every 5 minutes until `cancel`;
    /// None when cancelled before the first read finished.
    pub(crate) async fn from_api(client: &Client, cancel: &CancellationToken) -> Option<Self> {
        let names = AttrNames::default();
        tokio::select! {
            _ = names.refresh(client) => {}
            _ = cancel.cancelled() => return None,
        }
        let (n, c, stop) = (names.clone(), client.clone(), cancel.clone());
        tokio::spawn(async move {
            while crate::wait::sleep_unless_cancelled(REFRESH_EVERY, &stop).await {
                n.refresh(&c).await;
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

    /// Asks the API; on failure warns and keeps what it had (nothing, at start).
    pub(crate) async fn refresh(&self, client: &Client) {
        match client.get_attr_names().await {
            Ok(m) if m.is_empty() => {
                warn!("The app has no attribute names registered; not checking names locally");
                self.set(None);
            }
            Ok(m) => {
                let names: HashSet<String> = m.into_values().collect();
                debug!(count = names.len(), "Attribute names loaded");
                self.set(Some(names));
            }
            Err(e) => {
                // Names kept from an earlier answer may be stale (renamed or
                // added since): refusing updates on them would dead-letter
                // valid ones, so check nothing until the API answers again.
                warn!(error = %e, "Cannot read the app's attribute names; not checking names locally until it works");
                self.set(None);
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
        names.refresh(&client).await;
        let known = names.get().expect("names read from the API");
        assert!(known.contains("sex"));
        sim.pause().await;
        names.refresh(&client).await;
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
        let names = AttrNames::from_api(&client, &cancel)
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
}
