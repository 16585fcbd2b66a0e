//! Message parsing and validation never panic, and what they accept obeys
//! every rule of docs/messages.md.
#![no_main]

use std::collections::HashSet;

use imattr::coalesce::Coalescer;
use imattr::update::{parse, Rules, MAX_ACCOUNT_BYTES, MAX_ATTRS, MAX_NAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let allowed: HashSet<String> = ["sex", "city", "k0", "k1"].iter().map(|s| s.to_string()).collect();
    for rules in [
        Rules { max_value_bytes: 50, allowed: None },
        Rules { max_value_bytes: 50, allowed: Some(&allowed) },
    ] {
        let Ok(updates) = parse(data, &rules) else { continue };
        assert!(!updates.is_empty() && updates.len() <= 1000);
        let mut seen = HashSet::new();
        let mut c = Coalescer::new();
        let now = tokio::time::Instant::now();
        for u in &updates {
            assert!(seen.insert(u.account.clone()), "an account twice in one message");
            assert!(!u.account.is_empty() && u.account.len() <= MAX_ACCOUNT_BYTES);
            assert!(!u.attrs.is_empty() && u.attrs.len() <= MAX_ATTRS);
            let mut names = HashSet::new();
            for (k, v) in &u.attrs {
                assert!(!k.is_empty() && k.len() <= MAX_NAME_BYTES);
                assert!(v.len() <= rules.max_value_bytes);
                assert!(names.insert(k));
                if let Some(a) = rules.allowed {
                    assert!(a.contains(k));
                }
            }
            c.push(&u.account, u.attrs.clone(), 1, now);
        }
        let batch = c.take_batch(100);
        assert_eq!(batch.len(), updates.len().min(100));
    }
});
