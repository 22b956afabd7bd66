//! Time: event time, per-partition watermarks, clock-skew correction and lateness.
//!
//! The time stage sits between decode and features. For every event of a batch it decides, in
//! this order:
//!
//! 1. **Skew**: an event stamped more than `max_future_skew` ahead of the processing clock would
//!    drag the watermark into the future and make every honest event late. Policy `clamp`
//!    replaces its time by the processing time and marks it `time_corrected`; policy `dlq`
//!    rejects it ([`Rejection::FutureSkew`]).
//! 2. **Lateness**, against the operator watermark as it stands after the events before it: at
//!    or above the watermark the event is on time; below it by at most `allowed_lateness` it is
//!    *late* but still scored and folded into state; below that it is rejected
//!    ([`Rejection::TooLate`]) for the late output. Nothing is dropped silently.
//! 3. **Watermarks**: each source partition's watermark is the highest event time it has seen
//!    minus `max_out_of_orderness`. The operator watermark is the minimum over partitions that
//!    are not idle, and never goes backwards.
//!
//! **Idleness.** A partition is idle once it has delivered no event for `idle_timeout` of
//! *delivery time*: processing time during which the source delivered batches, counted at most
//! [`DELIVERY_GAP_MS`] per gap between two batches. A pause of the whole input, a broker stall,
//! an outage or a restart stops the delivery clock, so no partition goes idle because of it, and
//! when data resumes, the first partition to deliver does not count alone. Besides, a partition
//! the source reports as backlogged (records fetched but not yet delivered, lag at the broker,
//! no leader) is never idle ([`TimeStage::keep_active`]); one assigned but not yet heard from
//! holds the watermark until it delivers or goes idle; with every partition idle the watermark
//! stays where it is.
//!
//! The bound: a partition that is not idle is never behind the watermark by more than its own
//! disorder beyond `max_out_of_orderness` — the watermark is at most its highest event time minus
//! `max_out_of_orderness`, whatever pause, stall, restart or rebalance came in between. Only a
//! partition that delivered nothing, was read to its end, showed no lag and had a leader for
//! `idle_timeout` of delivery time (at least `idle_timeout` of processing time while the other
//! partitions delivered) can find the watermark ahead of its next events, by as much event time
//! as the other partitions covered meanwhile; those events are still scored while within
//! `allowed_lateness`.
//!
//! The stage holds no event data and does no I/O; the processing clock is passed in so tests and
//! replays control it. The watermark advances event by event, so what is late does not depend on
//! how events were cut into batches; idleness is judged once per batch.

use std::collections::BTreeMap;

use metrics::Counter;
use riskstream_common::{SkewPolicy, TimeConfig};

/// Why an event leaves the pipeline at the time stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Stamped `skew_ms` ahead of the processing clock under policy `dlq`.
    FutureSkew { skew_ms: i64 },
    /// Below the watermark by more than `allowed_lateness`.
    TooLate { watermark: i64, behind_ms: i64 },
}

impl Rejection {
    /// A sentence for the dead-letter or late output.
    pub fn describe(&self, config: &TimeConfig) -> String {
        match self {
            Rejection::FutureSkew { skew_ms } => format!(
                "event time is {skew_ms} ms ahead of the processing clock (max_future_skew is {} ms)",
                config.max_future_skew.as_millis()
            ),
            Rejection::TooLate {
                watermark,
                behind_ms,
            } => format!(
                "event time is {behind_ms} ms behind the watermark {watermark} (allowed_lateness is {} ms)",
                config.allowed_lateness.as_millis()
            ),
        }
    }
}

/// The time stage's decision for each event of a batch.
#[derive(Debug, Default, Clone)]
pub struct Assignment {
    /// Event time to use (corrected where clamped), per event; meaningless for rejected events.
    pub event_time: Vec<i64>,
    /// Scored although below the watermark.
    pub late: Vec<bool>,
    /// Event time replaced by the processing time (policy `clamp`).
    pub time_corrected: Vec<bool>,
    /// Events that are not scored, by index in the batch, in order.
    pub rejected: Vec<(usize, Rejection)>,
    /// The operator watermark when the batch began.
    pub watermark: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
struct PartitionClock {
    /// Highest event time seen; [`NO_EVENT`] for a partition assigned but not yet heard from.
    max_event_time: i64,
    /// The delivery clock when it last delivered an event (or was known to have some waiting).
    last_event_at: i64,
}

/// The longest gap between two batches that counts in full on the delivery clock: a longer one
/// (the input paused, the broker stalled) counts as this much.
pub const DELIVERY_GAP_MS: i64 = 1_000;

/// Processing time during which the source delivered: it runs between batches at most
/// [`DELIVERY_GAP_MS`] apart and stands still in a pause of the whole input.
#[derive(Debug, Clone, Copy, Default)]
struct DeliveryClock {
    /// Delivery time up to the last batch.
    elapsed: i64,
    /// Processing time of the last batch.
    last_at: Option<i64>,
}

impl DeliveryClock {
    /// The delivery clock at processing time `now_ms` (a pause counts at most one gap).
    fn at(&self, now_ms: i64) -> i64 {
        match self.last_at {
            Some(last) => self.elapsed + (now_ms - last).clamp(0, DELIVERY_GAP_MS),
            None => self.elapsed,
        }
    }

    /// A batch was delivered at `now_ms`.
    fn tick(&mut self, now_ms: i64) {
        self.elapsed = self.at(now_ms);
        self.last_at = Some(self.last_at.map_or(now_ms, |last| last.max(now_ms)));
    }
}

/// `max_event_time` of a partition that has not delivered an event yet.
const NO_EVENT: i64 = i64::MIN;

impl PartitionClock {
    fn watermark(&self, out_of_orderness: i64) -> Option<i64> {
        (self.max_event_time != NO_EVENT).then(|| self.max_event_time - out_of_orderness)
    }
}

/// Watermarks and lateness for the partitions one pipeline reads.
#[derive(Debug)]
pub struct TimeStage {
    config: TimeConfig,
    partitions: BTreeMap<i32, PartitionClock>,
    /// The operator watermark never goes backwards.
    emitted: Option<i64>,
    delivery: DeliveryClock,
    counters: TimeCounters,
}

#[derive(Debug)]
struct TimeCounters {
    late_scored: Counter,
    too_late: Counter,
    corrected: Counter,
    future_rejected: Counter,
}

impl TimeStage {
    pub fn new(config: &TimeConfig) -> Self {
        Self {
            config: config.clone(),
            partitions: BTreeMap::new(),
            emitted: None,
            delivery: DeliveryClock::default(),
            counters: TimeCounters {
                late_scored: metrics::counter!("riskstream_late_events_total", "outcome" => "scored"),
                too_late: metrics::counter!("riskstream_late_events_total", "outcome" => "late_output"),
                corrected: metrics::counter!("riskstream_clock_skew_corrections_total", "policy" => "clamp"),
                future_rejected: metrics::counter!("riskstream_clock_skew_corrections_total", "policy" => "dlq"),
            },
        }
    }

    pub fn config(&self) -> &TimeConfig {
        &self.config
    }

    /// The operator watermark at processing time `now_ms`, or `None` before any event.
    ///
    /// The minimum over partitions that delivered an event within `idle_timeout` of delivery
    /// time (see the module doc). A partition assigned but not heard from yet holds the
    /// watermark where it is until it delivers or goes idle, so that a partition read late does
    /// not find its events behind a watermark its siblings moved. With every partition idle,
    /// the watermark stays.
    pub fn watermark(&self, now_ms: i64) -> Option<i64> {
        let ooo = self.config.max_out_of_orderness.as_millis() as i64;
        let idle = self.config.idle_timeout.as_millis() as i64;
        let delivered = self.delivery.at(now_ms);
        let mut waiting = false;
        let mut active: Option<i64> = None;
        for p in self
            .partitions
            .values()
            .filter(|p| delivered - p.last_event_at <= idle)
        {
            match p.watermark(ooo) {
                Some(wm) => active = Some(active.map_or(wm, |a| a.min(wm))),
                None => waiting = true,
            }
        }
        if waiting {
            return self.emitted;
        }
        match (active, self.emitted) {
            (Some(c), Some(e)) => Some(c.max(e)),
            (c, e) => c.or(e),
        }
    }

    /// Marks `partitions` as active at `now_ms` without an event: their source has records of
    /// them waiting, so they must not count as idle.
    pub fn keep_active(&mut self, partitions: &[i32], now_ms: i64) {
        let delivered = self.delivery.at(now_ms);
        for p in partitions {
            if let Some(clock) = self.partitions.get_mut(p) {
                clock.last_event_at = clock.last_event_at.max(delivered);
            }
        }
    }

    /// Starts tracking a partition assigned to this pipeline at processing time `now_ms`, before
    /// its first event: it holds the watermark until it delivers one or goes idle. A partition
    /// already tracked (restored state) keeps its clock.
    pub fn add_partition(&mut self, partition: i32, now_ms: i64) {
        let delivered = self.delivery.at(now_ms);
        self.partitions.entry(partition).or_insert(PartitionClock {
            max_event_time: NO_EVENT,
            last_event_at: delivered,
        });
    }

    /// Stops tracking a partition (revoked in a rebalance): it no longer holds the watermark.
    pub fn remove_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// The partitions currently tracked and their watermarks (for status reporting).
    pub fn partition_watermarks(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        let ooo = self.config.max_out_of_orderness.as_millis() as i64;
        self.partitions
            .iter()
            .filter_map(move |(p, c)| Some((*p, c.watermark(ooo)?)))
    }

    /// Restores a partition's highest seen event time (recovery from a checkpoint).
    pub fn restore_partition(&mut self, partition: i32, max_event_time: i64, now_ms: i64) {
        let delivered = self.delivery.at(now_ms);
        self.partitions.insert(
            partition,
            PartitionClock {
                max_event_time,
                last_event_at: delivered,
            },
        );
    }

    /// Judges a batch: `event_time[i]` and `partition[i]` of each event, at processing time
    /// `now_ms`. Updates the partitions' watermarks with the events that are kept.
    pub fn assign(&mut self, event_time: &[i64], partition: &[i32], now_ms: i64) -> Assignment {
        debug_assert_eq!(event_time.len(), partition.len());
        self.delivery.tick(now_ms);
        let delivered = self.delivery.elapsed;
        let watermark = self.watermark(now_ms);
        let skew = self.config.max_future_skew.as_millis() as i64;
        let lateness = self.config.allowed_lateness.as_millis() as i64;
        let n = event_time.len();
        let mut out = Assignment {
            event_time: Vec::with_capacity(n),
            late: vec![false; n],
            time_corrected: vec![false; n],
            rejected: Vec::new(),
            watermark,
        };
        let mut current = watermark;
        for (i, (&t, &p)) in event_time.iter().zip(partition).enumerate() {
            let mut t = t;
            if t - now_ms > skew {
                match self.config.skew_policy {
                    SkewPolicy::Clamp => {
                        t = now_ms;
                        out.time_corrected[i] = true;
                        self.counters.corrected.increment(1);
                    }
                    SkewPolicy::Dlq => {
                        out.event_time.push(t);
                        out.rejected.push((
                            i,
                            Rejection::FutureSkew {
                                skew_ms: t - now_ms,
                            },
                        ));
                        self.counters.future_rejected.increment(1);
                        continue;
                    }
                }
            }
            out.event_time.push(t);
            if let Some(wm) = current {
                if t < wm {
                    if wm - t > lateness {
                        out.rejected.push((
                            i,
                            Rejection::TooLate {
                                watermark: wm,
                                behind_ms: wm - t,
                            },
                        ));
                        self.counters.too_late.increment(1);
                        continue;
                    }
                    out.late[i] = true;
                    self.counters.late_scored.increment(1);
                }
            }
            let (advanced, held) = match self.partitions.get_mut(&p) {
                Some(clock) => {
                    let ooo = self.config.max_out_of_orderness.as_millis() as i64;
                    // Only the partition holding the watermark can move it (a partition
                    // without events holds it too).
                    let held = clock.max_event_time == NO_EVENT
                        || current == Some(clock.max_event_time - ooo);
                    let advanced = t > clock.max_event_time;
                    clock.max_event_time = clock.max_event_time.max(t);
                    clock.last_event_at = delivered;
                    (advanced, held)
                }
                None => {
                    self.partitions.insert(
                        p,
                        PartitionClock {
                            max_event_time: t,
                            last_event_at: delivered,
                        },
                    );
                    (true, true)
                }
            };
            if advanced && (held || current.is_none()) {
                self.emitted = current;
                current = self.watermark(now_ms);
            }
        }
        self.emitted = self.watermark(now_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: i64 = 1000;
    const MIN: i64 = 60 * S;
    const NOW: i64 = 1_000_000 * S;

    fn config(policy: SkewPolicy) -> TimeConfig {
        TimeConfig {
            max_out_of_orderness: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_future_skew: Duration::from_secs(5),
            skew_policy: policy,
            allowed_lateness: Duration::from_secs(600),
        }
    }

    #[test]
    fn out_of_order_events_within_the_bound_are_on_time() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        let a = time.assign(
            &[NOW - 10 * S, NOW - 9 * S, NOW - 10 * S - 500],
            &[0, 0, 0],
            NOW,
        );
        assert_eq!(a.watermark, None);
        assert_eq!(a.late, [false, false, false], "within the same batch too");
        assert_eq!(time.watermark(NOW), Some(NOW - 11 * S));
        // 1.5 s behind the highest event time: inside max_out_of_orderness.
        let a = time.assign(&[NOW - 10 * S - 500, NOW - 8 * S], &[0, 0], NOW);
        assert_eq!(a.late, [false, false]);
        assert!(a.rejected.is_empty());
        assert_eq!(time.watermark(NOW), Some(NOW - 10 * S));
    }

    #[test]
    fn late_events_inside_allowed_lateness_are_scored_and_older_ones_rejected() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.assign(&[NOW - 20 * MIN], &[0], NOW);
        let wm = NOW - 20 * MIN - 2 * S;
        let a = time.assign(
            &[wm - 6 * MIN, wm - 10 * MIN, wm - 10 * MIN - 1, wm],
            &[0, 0, 0, 0],
            NOW,
        );
        assert_eq!(a.watermark, Some(wm));
        assert_eq!(a.late, [true, true, false, false]);
        assert_eq!(
            a.rejected,
            [(
                2,
                Rejection::TooLate {
                    watermark: wm,
                    behind_ms: 10 * MIN + 1
                }
            )]
        );
        // Late events do not move the watermark back.
        assert_eq!(time.watermark(NOW), Some(wm));
    }

    #[test]
    fn future_stamped_events_are_clamped_or_rejected() {
        let mut clamp = TimeStage::new(&config(SkewPolicy::Clamp));
        let a = clamp.assign(&[NOW + 5 * S, NOW + 3600 * S], &[0, 0], NOW);
        assert_eq!(a.time_corrected, [false, true]);
        assert_eq!(a.event_time, [NOW + 5 * S, NOW]);
        // The clamped event did not drag the watermark an hour ahead.
        assert_eq!(clamp.watermark(NOW), Some(NOW + 3 * S));

        let mut dlq = TimeStage::new(&config(SkewPolicy::Dlq));
        let a = dlq.assign(&[NOW, NOW + 3600 * S], &[0, 0], NOW);
        assert_eq!(
            a.rejected,
            [(1, Rejection::FutureSkew { skew_ms: 3600 * S })]
        );
        assert_eq!(dlq.watermark(NOW), Some(NOW - 2 * S));
    }

    /// Partition `p` delivers one event a second at processing times `from`, `from + 1 s`, …
    /// up to `to`, each stamped `lead` ahead of its processing time.
    fn deliver_each_second(time: &mut TimeStage, p: i32, from: i64, to: i64, lead: i64) {
        let mut now = from;
        while now <= to {
            time.assign(&[now + lead], &[p], now);
            now += S;
        }
    }

    #[test]
    fn an_idle_partition_stops_holding_the_watermark_back() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.assign(&[NOW - 100 * S, NOW - 5 * S], &[0, 1], NOW);
        assert_eq!(
            time.watermark(NOW),
            Some(NOW - 102 * S),
            "partition 0 holds it"
        );
        // Partition 1 keeps delivering; partition 0 falls silent for 10 s of delivery.
        deliver_each_second(&mut time, 1, NOW + S, NOW + 10 * S, -5 * S);
        assert_eq!(time.watermark(NOW + 10 * S), Some(NOW - 102 * S));
        deliver_each_second(&mut time, 1, NOW + 11 * S, NOW + 11 * S, -5 * S);
        assert_eq!(
            time.watermark(NOW + 11 * S),
            Some(NOW + 4 * S),
            "idle partition 0 no longer holds it back"
        );
        // When partition 0 wakes up, the watermark does not go backwards.
        let a = time.assign(&[NOW - 99 * S], &[0], NOW + 12 * S);
        assert_eq!(a.late, [true]);
        assert_eq!(time.watermark(NOW + 12 * S), Some(NOW + 4 * S));
    }

    #[test]
    fn a_pause_of_the_whole_input_makes_no_partition_idle() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.add_partition(0, NOW);
        time.add_partition(1, NOW);
        // Partition 0 runs 50 s of event time ahead of partition 1.
        time.assign(&[NOW - 10 * S, NOW - 60 * S], &[0, 1], NOW);
        assert_eq!(time.watermark(NOW), Some(NOW - 62 * S));
        // Nothing arrives for 48 s (a pause, a broker stall): nobody is idle, nothing moves.
        assert_eq!(time.watermark(NOW + 48 * S), Some(NOW - 62 * S));
        // Partition 0 resumes first with a batch spanning a minute of event time, and keeps
        // delivering for 9 s while partition 1's records are still on their way.
        let a = time.assign(&[NOW - 9 * S, NOW + 50 * S], &[0, 0], NOW + 48 * S);
        assert!(a.late.iter().all(|l| !l) && a.rejected.is_empty());
        deliver_each_second(&mut time, 0, NOW + 49 * S, NOW + 57 * S, 0);
        assert_eq!(
            time.watermark(NOW + 57 * S),
            Some(NOW - 62 * S),
            "partition 1 still holds the watermark after the pause"
        );
        // Partition 1's next events, within its own disorder bound, are on time.
        let a = time.assign(&[NOW - 61 * S, NOW - 59 * S], &[1, 1], NOW + 57 * S);
        assert_eq!(a.late, [false, false]);
        assert_eq!(time.watermark(NOW + 57 * S), Some(NOW - 61 * S));
    }

    #[test]
    fn every_partition_idle_keeps_the_watermark_where_it_is() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.add_partition(0, NOW);
        time.add_partition(1, NOW);
        time.assign(&[NOW - 10 * S, NOW - 60 * S], &[0, 1], NOW);
        // Every event of the next 12 s of delivery is rejected (too far behind): the batches
        // run the delivery clock, but no partition delivers an event.
        for i in 1..=12 {
            let a = time.assign(&[NOW - 3600 * S], &[0], NOW + i * S);
            assert_eq!(a.rejected.len(), 1);
        }
        assert_eq!(
            time.watermark(NOW + 12 * S),
            Some(NOW - 62 * S),
            "not the furthest partition's"
        );
    }

    #[test]
    fn an_assigned_partition_without_events_holds_the_watermark_until_it_delivers_or_idles() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.add_partition(0, NOW);
        time.add_partition(1, NOW);
        // Partition 0 is read first and runs an hour ahead ...
        let a = time.assign(&[NOW - 60 * MIN, NOW], &[0, 0], NOW);
        assert!(a.rejected.is_empty());
        assert_eq!(time.watermark(NOW), None, "partition 1 has not spoken");
        // ... so partition 1's first events, an hour behind, are on time.
        let a = time.assign(&[NOW - 59 * MIN], &[1], NOW + S);
        assert!(a.rejected.is_empty() && a.late == [false]);
        assert_eq!(time.watermark(NOW + S), Some(NOW - 59 * MIN - 2 * S));
        // A partition that never delivers stops holding it after the idle timeout of delivery.
        time.add_partition(2, NOW + S);
        assert_eq!(time.watermark(NOW + 5 * S), Some(NOW - 59 * MIN - 2 * S));
        for i in 2..=12 {
            time.assign(&[NOW + S], &[0], NOW + i * S);
            time.assign(&[NOW + S], &[1], NOW + i * S);
        }
        assert_eq!(time.watermark(NOW + 12 * S), Some(NOW - S));
        // A partition whose source has records waiting is not idle, however long it is silent.
        time.add_partition(3, NOW + 12 * S);
        for i in 13..=30 {
            time.keep_active(&[3], NOW + i * S);
            time.assign(&[NOW + 2 * S], &[0], NOW + i * S);
            time.assign(&[NOW + 2 * S], &[1], NOW + i * S);
        }
        assert_eq!(
            time.watermark(NOW + 30 * S),
            Some(NOW - S),
            "partition 3 holds it"
        );
        // Restored clocks are kept: adding a known partition changes nothing.
        time.add_partition(0, NOW + 30 * S);
        assert_eq!(time.watermark(NOW + 30 * S), Some(NOW - S));
        // Without deliveries nothing goes idle, however long the pause.
        assert_eq!(time.watermark(NOW + 300 * S), Some(NOW - S));
    }

    #[test]
    fn lateness_does_not_depend_on_batch_boundaries() {
        let times = [
            NOW - 60 * MIN,
            NOW - 50 * MIN,
            NOW - 55 * MIN,
            NOW - 40 * MIN,
            NOW - 52 * MIN,
            NOW - 30 * MIN,
        ];
        let mut whole = TimeStage::new(&config(SkewPolicy::Clamp));
        let a = whole.assign(&times, &[0; 6], NOW);
        let mut split = TimeStage::new(&config(SkewPolicy::Clamp));
        let mut late = Vec::new();
        let mut rejected = 0;
        for chunk in times.chunks(2) {
            let b = split.assign(chunk, &[0; 2], NOW);
            late.extend(b.late);
            rejected += b.rejected.len();
        }
        assert_eq!(a.late, late);
        assert_eq!(a.late, [false, false, true, false, false, false]);
        assert_eq!(a.rejected.len(), rejected);
        assert_eq!(a.rejected[0].0, 4, "12 minutes behind the watermark");
        assert_eq!(whole.watermark(NOW), split.watermark(NOW));
    }

    #[test]
    fn removing_a_partition_releases_the_watermark() {
        let mut time = TimeStage::new(&config(SkewPolicy::Clamp));
        time.assign(&[NOW - 100 * S, NOW], &[0, 1], NOW);
        assert_eq!(time.watermark(NOW), Some(NOW - 102 * S));
        time.remove_partition(0);
        assert_eq!(time.watermark(NOW), Some(NOW - 2 * S));
        assert_eq!(
            time.partition_watermarks().collect::<Vec<_>>(),
            [(1, NOW - 2 * S)]
        );
    }
}
