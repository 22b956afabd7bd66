//! Which source offsets may be committed: those of batches whose every output message (verdict,
//! dead letter, late event) the broker has acknowledged, and of every batch before them.
//!
//! The sink opens a ticket per batch, counts the messages it sends under it and seals it with
//! the batch's positions; delivery reports close messages. Batches complete strictly in order,
//! so a committed offset never skips an event whose verdict is still in flight. This module
//! does not talk to Kafka; the source commits what it reports.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use riskstream_common::Position;

/// Delivery bookkeeping shared by the sink (sends, delivery reports) and the source (commits).
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence number of `pending[0]`.
    first_seq: u64,
    pending: VecDeque<Ticket>,
    /// Next offset to consume per partition, for partitions whose batches all completed.
    committable: BTreeMap<i32, i64>,
    /// Partitions currently owned; offsets of others are never reported as committable.
    assigned: BTreeSet<i32>,
    /// Messages sent and not yet acknowledged.
    unacked: usize,
    /// The first permanent delivery failure.
    failed: Option<String>,
    acked: u64,
}

#[derive(Debug, Default)]
struct Ticket {
    remaining: usize,
    sealed: bool,
    /// Highest offset + 1 per partition of the batch.
    next_offsets: Vec<(i32, i64)>,
}

/// A batch's handle in the tracker; carried by every message the batch produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketId(pub u64);

impl DeliveryTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: still consistent enough
        // to keep reporting (and the panic itself stops the pipeline).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the ticket of the next batch.
    pub fn open(&self) -> TicketId {
        let mut inner = self.lock();
        let id = inner.first_seq + inner.pending.len() as u64;
        inner.pending.push_back(Ticket::default());
        TicketId(id)
    }

    /// `n` more messages of `ticket` are on their way (counted before they are sent, so that
    /// an acknowledgement never arrives before its message was counted).
    pub fn sent(&self, ticket: TicketId, n: usize) {
        let mut inner = self.lock();
        inner.unacked += n;
        if let Some(t) = inner.ticket(ticket) {
            t.remaining += n;
        }
    }

    /// `n` messages of `ticket` counted by [`Self::sent`] could not be handed to the producer
    /// after all: they are not in flight.
    pub fn unsent(&self, ticket: TicketId, n: usize) {
        let mut inner = self.lock();
        inner.unacked = inner.unacked.saturating_sub(n);
        if let Some(t) = inner.ticket(ticket) {
            t.remaining = t.remaining.saturating_sub(n);
        }
        inner.advance();
    }

    /// All messages of `ticket` were sent; `positions` are the source positions of its batch.
    pub fn seal(&self, ticket: TicketId, positions: &[Position]) {
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for p in positions {
            let e = next.entry(p.partition).or_insert(p.offset + 1);
            *e = (*e).max(p.offset + 1);
        }
        let mut inner = self.lock();
        if let Some(t) = inner.ticket(ticket) {
            t.sealed = true;
            t.next_offsets = next.into_iter().collect();
        }
        inner.advance();
    }

    /// The broker acknowledged a message of `ticket` (`Ok`), or the producer gave up on it.
    pub fn delivered(&self, ticket: TicketId, result: Result<(), String>) {
        let mut inner = self.lock();
        inner.unacked = inner.unacked.saturating_sub(1);
        match result {
            Ok(()) => {
                inner.acked += 1;
                if let Some(t) = inner.ticket(ticket) {
                    t.remaining = t.remaining.saturating_sub(1);
                }
                inner.advance();
            }
            // The batch never completes: its offsets, and all later ones, stay uncommitted.
            Err(e) => {
                inner.failed.get_or_insert(e);
            }
        }
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.lock().unacked
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// The first permanent delivery failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Whether every opened batch has completed.
    pub fn idle(&self) -> bool {
        self.lock().pending.is_empty()
    }

    /// The source now owns `partitions` (in addition to what it had).
    pub fn assign(&self, partitions: &[i32]) {
        let mut inner = self.lock();
        inner.assigned.extend(partitions.iter().copied());
    }

    /// The source lost `partitions`: returns their committable offsets (to commit now) and
    /// forgets them, so that later acknowledgements never commit for a new owner.
    pub fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for p in partitions {
            inner.assigned.remove(p);
            if let Some(next) = inner.committable.remove(p) {
                out.push((*p, next));
            }
        }
        out
    }

    /// Committable offsets of owned partitions (next offset to consume), leaving them recorded.
    pub fn committable(&self) -> Vec<(i32, i64)> {
        let inner = self.lock();
        inner
            .committable
            .iter()
            .filter(|(p, _)| inner.assigned.contains(p))
            .map(|(p, o)| (*p, *o))
            .collect()
    }
}

impl Inner {
    fn ticket(&mut self, id: TicketId) -> Option<&mut Ticket> {
        let index = id.0.checked_sub(self.first_seq)?;
        self.pending.get_mut(usize::try_from(index).ok()?)
    }

    /// Retires completed batches from the front, in order.
    fn advance(&mut self) {
        while self
            .pending
            .front()
            .is_some_and(|t| t.sealed && t.remaining == 0)
        {
            let Some(done) = self.pending.pop_front() else {
                break;
            };
            self.first_seq += 1;
            for (partition, next) in done.next_offsets {
                if !self.assigned.contains(&partition) {
                    continue;
                }
                let e = self.committable.entry(partition).or_insert(next);
                *e = (*e).max(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn offsets_advance_only_through_fully_acknowledged_batches_in_order() {
        let t = DeliveryTracker::new();
        t.assign(&[0, 1]);
        let a = t.open();
        t.sent(a, 2);
        t.seal(a, &[pos(0, 10), pos(1, 4), pos(0, 11)]);
        let b = t.open();
        t.sent(b, 1);
        t.seal(b, &[pos(0, 12)]);
        // The later batch is acknowledged first: nothing is committable yet.
        t.delivered(b, Ok(()));
        t.delivered(a, Ok(()));
        assert!(t.committable().is_empty());
        assert_eq!(t.unacked(), 1);
        t.delivered(a, Ok(()));
        assert_eq!(t.committable(), vec![(0, 13), (1, 5)]);
        assert!(t.idle());
    }

    #[test]
    fn a_failed_delivery_blocks_its_batch_and_all_later_ones() {
        let t = DeliveryTracker::new();
        t.assign(&[0]);
        let a = t.open();
        t.sent(a, 1);
        t.seal(a, &[pos(0, 1)]);
        let b = t.open();
        t.sent(b, 1);
        t.seal(b, &[pos(0, 2)]);
        t.delivered(a, Err("message too large".into()));
        t.delivered(b, Ok(()));
        assert!(t.committable().is_empty());
        assert_eq!(t.failure().as_deref(), Some("message too large"));
    }

    #[test]
    fn revoked_partitions_are_handed_back_once_and_never_reported_again() {
        let t = DeliveryTracker::new();
        t.assign(&[0, 1]);
        let a = t.open();
        t.sent(a, 1);
        t.seal(a, &[pos(0, 1), pos(1, 1)]);
        t.delivered(a, Ok(()));
        assert_eq!(t.revoke(&[1]), vec![(1, 2)]);
        // A batch of the revoked partition completing later does not make it committable.
        let b = t.open();
        t.sent(b, 1);
        t.seal(b, &[pos(1, 7)]);
        t.delivered(b, Ok(()));
        assert_eq!(t.committable(), vec![(0, 2)]);
    }

    #[test]
    fn a_batch_without_messages_completes_when_sealed() {
        let t = DeliveryTracker::new();
        t.assign(&[3]);
        let a = t.open();
        t.sent(a, 1);
        t.unsent(a, 1);
        t.seal(a, &[pos(3, 40)]);
        assert_eq!(t.committable(), vec![(3, 41)]);
    }
}
