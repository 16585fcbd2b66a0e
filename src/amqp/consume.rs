//! Which deliveries to acknowledge, and how: a pure tracker that turns
//! settled delivery tags into as few `basic.ack` frames as possible.
//!
//! Tags on one channel start at 1 and grow by one. Settled tags directly
//! above the acked floor go out as one `multiple` ack. Settled tags behind a
//! gap (a delivery still being retried) wait, unless too many are waiting:
//! then they are acked one by one so that the prefetch window never fills up
//! with finished work.

use std::collections::BTreeSet;

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckOp {
    /// The delivery tag.
    pub tag: u64,
    /// Acknowledge every outstanding delivery up to `tag`.
    pub multiple: bool,
}

/// The tracker for one channel.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Every tag ≤ floor is acknowledged.
    floor: u64,
    /// Settled, not yet acknowledged, above the floor.
    settled: BTreeSet<u64>,
    /// Acknowledged one by one, above the floor.
    acked_alone: BTreeSet<u64>,
}

impl AckTracker {
    /// A tracker for a fresh channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks a delivery as done (applied, or its dead-letter copy confirmed).
    pub fn settle(&mut self, tag: u64) {
        if tag > self.floor && !self.acked_alone.contains(&tag) {
            self.settled.insert(tag);
        }
    }

    /// Settled deliveries not yet acknowledged.
    pub fn waiting(&self) -> usize {
        self.settled.len()
    }

    /// The acks to send now. Deliveries behind a gap are acked one by one
    /// when more than `max_waiting` of them wait (or always, with 0).
    pub fn take_acks(&mut self, max_waiting: usize) -> Vec<AckOp> {
        let mut ops = Vec::new();
        // The contiguous run above the floor.
        let mut top = self.floor;
        let mut last_settled = None;
        loop {
            let next = top + 1;
            if self.settled.remove(&next) {
                last_settled = Some(next);
            } else if !self.acked_alone.remove(&next) {
                break;
            }
            top = next;
        }
        self.floor = top;
        if let Some(tag) = last_settled {
            ops.push(AckOp {
                tag,
                multiple: true,
            });
        }
        if !self.settled.is_empty() && self.settled.len() > max_waiting {
            for tag in std::mem::take(&mut self.settled) {
                self.acked_alone.insert(tag);
                ops.push(AckOp {
                    tag,
                    multiple: false,
                });
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_run_is_one_multiple_ack() {
        let mut t = AckTracker::new();
        for tag in [3, 1, 2] {
            t.settle(tag);
        }
        assert_eq!(
            t.take_acks(100),
            vec![AckOp {
                tag: 3,
                multiple: true
            }]
        );
        assert!(t.take_acks(100).is_empty());
        t.settle(4);
        assert_eq!(
            t.take_acks(100),
            vec![AckOp {
                tag: 4,
                multiple: true
            }]
        );
    }

    #[test]
    fn gap_waits_until_too_many_then_acks_alone() {
        let mut t = AckTracker::new();
        t.settle(1);
        t.settle(3);
        t.settle(4);
        assert_eq!(
            t.take_acks(2),
            vec![AckOp {
                tag: 1,
                multiple: true
            }]
        );
        assert_eq!(t.waiting(), 2);
        t.settle(5);
        assert_eq!(
            t.take_acks(2),
            vec![
                AckOp {
                    tag: 3,
                    multiple: false
                },
                AckOp {
                    tag: 4,
                    multiple: false
                },
                AckOp {
                    tag: 5,
                    multiple: false
                }
            ]
        );
        // The gap fills: the multiple ack must end on a tag not yet acked.
        t.settle(2);
        assert_eq!(
            t.take_acks(2),
            vec![AckOp {
                tag: 2,
                multiple: true
            }]
        );
        t.settle(6);
        assert_eq!(
            t.take_acks(2),
            vec![AckOp {
                tag: 6,
                multiple: true
            }]
        );
        // Settling an already acked tag again is ignored.
        t.settle(4);
        assert!(t.take_acks(0).is_empty());
    }

    #[test]
    fn zero_threshold_acks_everything_now() {
        let mut t = AckTracker::new();
        t.settle(2);
        t.settle(5);
        assert_eq!(
            t.take_acks(0),
            vec![
                AckOp {
                    tag: 2,
                    multiple: false
                },
                AckOp {
                    tag: 5,
                    multiple: false
                }
            ]
        );
        t.settle(1);
        assert_eq!(
            t.take_acks(0),
            vec![AckOp {
                tag: 1,
                multiple: true
            }]
        );
        t.settle(3);
        t.settle(4);
        // 3 and 4 end the run; 5 was acked alone, so the run stops at 4... and 5 is absorbed.
        assert_eq!(
            t.take_acks(0),
            vec![AckOp {
                tag: 4,
                multiple: true
            }]
        );
        t.settle(6);
        assert_eq!(
            t.take_acks(0),
            vec![AckOp {
                tag: 6,
                multiple: true
            }]
        );
    }

    /// Every settled tag is acknowledged exactly once, whatever the order.
    #[test]
    fn random_orders_ack_each_tag_once() {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for round in 0..200 {
            let n = 1 + round % 60;
            let mut tags: Vec<u64> = (1..=n).collect();
            tags.shuffle(&mut rng);
            let mut t = AckTracker::new();
            let mut acked = BTreeSet::new();
            let mut floor = 0;
            for (i, tag) in tags.iter().enumerate() {
                t.settle(*tag);
                for op in t.take_acks(i % 4) {
                    if op.multiple {
                        assert!(op.tag > floor);
                        assert!(!acked.contains(&op.tag), "multiple ack on an acked tag");
                        for x in floor + 1..=op.tag {
                            acked.insert(x);
                        }
                        floor = op.tag;
                    } else {
                        assert!(acked.insert(op.tag), "tag {} acked twice", op.tag);
                    }
                }
            }
            for op in t.take_acks(0) {
                if op.multiple {
                    for x in floor + 1..=op.tag {
                        acked.insert(x);
                    }
                    floor = op.tag;
                } else {
                    assert!(acked.insert(op.tag));
                }
            }
            assert_eq!(acked.len() as u64, n);
        }
    }
}
