//! Exact sliding-window state for one feature and one entity key, kept as time panes.
//!
//! The window of an event at time `t` is `(t − W, t]` over the events processed so far. Events
//! are bucketed into panes of `P = W / PANES_PER_WINDOW`; each pane keeps a pre-aggregated
//! [`Summary`], and the events themselves are kept once, sorted by time, in one buffer. A query
//! combines the summaries of the panes fully inside the window (at most `PANES_PER_WINDOW + 1`
//! of them, whatever the window length) and looks at single events only in the pane cut by the
//! left edge (binary search to the edge, then up to the pane end), so the result is exact to the
//! millisecond while the number of panes touched does not grow with the window or the key's
//! event rate. The pane cut by the right edge needs a look inside only when the event is out of
//! order (some events of that pane are newer than it).
//!
//! Panes entirely older than a horizon are evicted as the watermark passes it.

use std::cmp::Ordering;
use std::collections::VecDeque;

/// Panes per window length: the cost of a query is about this many summary merges.
pub const PANES_PER_WINDOW: i64 = 16;

/// Mergeable statistics of a set of values (Chan et al. for the variance).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    mean: f64,
    m2: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Summary {
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Summary) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *o;
            return;
        }
        let n = (self.count + o.count) as f64;
        let delta = o.mean - self.mean;
        self.m2 += o.m2 + delta * delta * (self.count as f64) * (o.count as f64) / n;
        self.mean += delta * o.count as f64 / n;
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// `sum / count`, or `None` for an empty set.
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Sample standard deviation (n − 1), or `None` below two values.
    pub fn stddev(&self) -> Option<f64> {
        (self.count > 1).then(|| (self.m2.max(0.0) / (self.count - 1) as f64).sqrt())
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }
}

/// One event of a window: event time, processing sequence (ties: later processed wins), value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub ts: i64,
    pub seq: u64,
    pub value: f64,
}

impl Entry {
    fn order(&self) -> (i64, u64) {
        (self.ts, self.seq)
    }
}

/// A time bucket `[start, start + P)`: its summary and the newest event time in it. Its events
/// are the `summary.count` entries of the window that fall in the bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pane {
    start: i64,
    max_ts: i64,
    summary: Summary,
}

/// The state of one feature for one entity key: pane summaries plus the events themselves, all
/// in two flat buffers (one allocation each, whatever the number of panes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyWindow {
    /// Sorted by `start`.
    panes: VecDeque<Pane>,
    /// Every event of every pane, sorted by `(ts, seq)`.
    entries: VecDeque<Entry>,
}

impl KeyWindow {
    /// Pane length for a window of `window_ms`.
    pub fn pane_ms(window_ms: i64) -> i64 {
        (window_ms / PANES_PER_WINDOW).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.panes.is_empty()
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn insert(&mut self, pane_ms: i64, e: Entry) {
        // Entries: in order, an append; out of order, an insert near the end.
        match self.entries.back() {
            Some(last) if last.order() > e.order() => {
                let at = self.entries.partition_point(|x| x.order() <= e.order());
                self.entries.insert(at, e);
            }
            _ => self.entries.push_back(e),
        }
        let start = e.ts.div_euclid(pane_ms) * pane_ms;
        let at = match self.panes.back_mut() {
            Some(last) if last.start == start => {
                last.add(e);
                return;
            }
            Some(last) if last.start < start => self.panes.len(),
            None => 0,
            Some(_) => match self.panes.binary_search_by(|p| p.start.cmp(&start)) {
                Ok(i) => {
                    self.panes[i].add(e);
                    return;
                }
                Err(i) => i,
            },
        };
        let mut pane = Pane {
            start,
            max_ts: i64::MIN,
            summary: Summary::default(),
        };
        pane.add(e);
        self.panes.insert(at, pane);
    }

    /// Summary of the entries with `lo < ts <= hi`.
    fn partial(&self, lo: i64, hi: i64) -> Summary {
        let from = self.entries.partition_point(|e| e.ts <= lo);
        let mut s = Summary::default();
        for e in self.entries.range(from..).take_while(|e| e.ts <= hi) {
            s.add(e.value);
        }
        s
    }

    /// Summary of the events with `t − window < ts <= t`.
    pub fn summary(&self, pane_ms: i64, window_ms: i64, t: i64) -> Summary {
        let lo = t - window_ms;
        let mut s = Summary::default();
        // Panes are sorted by start; skip those entirely at or before `lo`.
        let first = self.panes.partition_point(|p| p.start + pane_ms <= lo + 1);
        for pane in self.panes.range(first..) {
            if pane.start > t {
                break;
            }
            if pane.start > lo && pane.max_ts <= t {
                s.merge(&pane.summary);
            } else {
                // Cut by an edge: the pane's own events inside the window.
                let pane_lo = lo.max(pane.start - 1);
                let pane_hi = t.min(pane.start + pane_ms - 1);
                s.merge(&self.partial(pane_lo, pane_hi));
            }
        }
        s
    }

    /// The latest entry with `t − window < ts <= t` (ties: the one processed last).
    pub fn last(&self, window_ms: i64, t: i64) -> Option<Entry> {
        let to = self.entries.partition_point(|e| e.ts <= t);
        let e = *self.entries.get(to.checked_sub(1)?)?;
        (e.ts > t - window_ms).then_some(e)
    }

    /// Number of distinct values among the events with `t − window < ts <= t`. `scratch` is a
    /// reusable buffer, so a query allocates nothing once it has grown.
    pub fn count_distinct(&self, window_ms: i64, t: i64, scratch: &mut Vec<u64>) -> u64 {
        let lo = t - window_ms;
        let from = self.entries.partition_point(|e| e.ts <= lo);
        scratch.clear();
        scratch.extend(
            self.entries
                .range(from..)
                .take_while(|e| e.ts <= t)
                .map(|e| e.value.to_bits()),
        );
        scratch.sort_unstable();
        scratch.dedup();
        scratch.len() as u64
    }

    /// Drops panes that end at or before `horizon` (no event still to come can reach them).
    pub fn evict(&mut self, pane_ms: i64, horizon: i64) -> usize {
        let mut dropped = 0;
        while let Some(p) = self.panes.front() {
            if p.start + pane_ms > horizon {
                break;
            }
            dropped += p.summary.count as usize;
            self.panes.pop_front();
        }
        self.entries.drain(..dropped.min(self.entries.len()));
        // Keep small buffers for the key's next events; give large ones back.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
            self.panes.shrink_to(self.panes.len() * 2);
        }
        dropped
    }
}

impl Pane {
    fn add(&mut self, e: Entry) {
        self.summary.add(e.value);
        self.max_ts = self.max_ts.max(e.ts);
    }
}

/// Encoding of a [`KeyWindow`] for the state store (little-endian).
impl KeyWindow {
    /// Approximate heap bytes held (for the cache's memory cap).
    pub fn approx_bytes(&self) -> usize {
        2 * std::mem::size_of::<VecDeque<()>>()
            + self.panes.capacity() * std::mem::size_of::<Pane>()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// Appends the encoding of this window to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(8 + self.panes.len() * 64 + self.entries.len() * 24);
        out.extend_from_slice(&(self.panes.len() as u32).to_le_bytes());
        for p in &self.panes {
            out.extend_from_slice(&p.start.to_le_bytes());
            out.extend_from_slice(&p.max_ts.to_le_bytes());
            let s = &p.summary;
            out.extend_from_slice(&s.count.to_le_bytes());
            for v in [s.sum, s.mean, s.m2, s.min, s.max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.ts.to_le_bytes());
            out.extend_from_slice(&e.seq.to_le_bytes());
            out.extend_from_slice(&e.value.to_le_bytes());
        }
    }

    /// Decodes a window written by [`Self::encode`] from the front of `bytes`, advancing it;
    /// `None` if the bytes are not one (or the panes and entries disagree).
    pub fn decode_from(bytes: &mut &[u8]) -> Option<KeyWindow> {
        let mut r = Reader(bytes);
        let panes = r.u32()? as usize;
        let mut w = KeyWindow {
            panes: VecDeque::with_capacity(panes.min(r.0.len() / 64)),
            entries: VecDeque::new(),
        };
        let mut counted = 0u64;
        for _ in 0..panes {
            let pane = Pane {
                start: r.i64()?,
                max_ts: r.i64()?,
                summary: Summary {
                    count: r.u64()?,
                    sum: r.f64()?,
                    mean: r.f64()?,
                    m2: r.f64()?,
                    min: r.f64()?,
                    max: r.f64()?,
                },
            };
            counted = counted.checked_add(pane.summary.count)?;
            w.panes.push_back(pane);
        }
        let n = r.u32()? as usize;
        if n as u64 != counted {
            return None;
        }
        w.entries.reserve_exact(n.min(r.0.len() / 24));
        for _ in 0..n {
            w.entries.push_back(Entry {
                ts: r.i64()?,
                seq: r.u64()?,
                value: r.f64()?,
            });
        }
        *bytes = r.0;
        Some(w)
    }

    /// Decodes exactly one window.
    pub fn decode(mut bytes: &[u8]) -> Option<KeyWindow> {
        let w = Self::decode_from(&mut bytes)?;
        bytes.is_empty().then_some(w)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
    fn f64(&mut self) -> Option<f64> {
        self.take().map(f64::from_le_bytes)
    }
}

/// Compares entries by time, then processing order.
pub fn entry_order(a: &Entry, b: &Entry) -> Ordering {
    (a.ts, a.seq).cmp(&(b.ts, b.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, computed the slow way.
    fn naive(events: &[Entry], window: i64, t: i64) -> Summary {
        let mut s = Summary::default();
        for e in events.iter().filter(|e| e.ts > t - window && e.ts <= t) {
            s.add(e.value);
        }
        s
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
            _ => false,
        }
    }

    #[test]
    fn matches_the_definition_on_random_out_of_order_streams() {
        for (seed, window) in [
            (1, 10_000),
            (2, 60_000),
            (3, 1_000),
            (4, 3_600_000),
            (5, 17),
        ] {
            let mut rng = Lcg(seed);
            let pane = KeyWindow::pane_ms(window);
            let mut w = KeyWindow::default();
            let mut seen = Vec::new();
            let mut now = 1_000_000i64;
            for seq in 0..3000u64 {
                now += rng.next(window as u64 / 8 + 2) as i64;
                // About one event in ten arrives out of order, by up to half a window.
                let ts = if rng.next(10) == 0 {
                    now - rng.next(window as u64 / 2 + 1) as i64
                } else {
                    now
                };
                let value = (rng.next(100_000) as f64) / 100.0;
                let e = Entry { ts, seq, value };
                w.insert(pane, e);
                seen.push(e);
                let got = w.summary(pane, window, ts);
                let want = naive(&seen, window, ts);
                assert_eq!(got.count, want.count, "seed {seed} seq {seq}");
                assert!(close(Some(got.sum), Some(want.sum)));
                assert!(close(got.avg(), want.avg()));
                assert!(
                    close(got.stddev(), want.stddev()),
                    "{:?} {:?}",
                    got.stddev(),
                    want.stddev()
                );
                assert_eq!(got.min(), want.min());
                assert_eq!(got.max(), want.max());
                let last = seen
                    .iter()
                    .filter(|x| x.ts > ts - window && x.ts <= ts)
                    .max_by(|a, b| entry_order(a, b))
                    .copied();
                assert_eq!(w.last(window, ts), last);
                let mut distinct: Vec<u64> = seen
                    .iter()
                    .filter(|x| x.ts > ts - window && x.ts <= ts)
                    .map(|x| x.value.to_bits())
                    .collect();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(
                    w.count_distinct(window, ts, &mut Vec::new()),
                    distinct.len() as u64
                );
            }
        }
    }

    #[test]
    fn window_edges_are_exact_to_the_millisecond() {
        let window = 1000;
        let pane = KeyWindow::pane_ms(window);
        let mut w = KeyWindow::default();
        for (seq, ts) in [0i64, 1, 999, 1000, 1001].into_iter().enumerate() {
            w.insert(
                pane,
                Entry {
                    ts,
                    seq: seq as u64,
                    value: 1.0,
                },
            );
        }
        // (1000 − 1000, 1000] excludes ts 0, includes ts 1 and 1000.
        assert_eq!(w.summary(pane, window, 1000).count, 3);
        assert_eq!(w.summary(pane, window, 1001).count, 3);
        assert_eq!(w.summary(pane, window, 999).count, 3);
        assert_eq!(w.summary(pane, window, 0).count, 1);
        assert_eq!(w.summary(pane, window, -1).count, 0);
    }

    #[test]
    fn windows_survive_encoding() {
        let pane = KeyWindow::pane_ms(60_000);
        let mut w = KeyWindow::default();
        for seq in 0..100u64 {
            w.insert(
                pane,
                Entry {
                    ts: (seq as i64) * 997,
                    seq,
                    value: seq as f64 * 1.5,
                },
            );
        }
        let mut bytes = Vec::new();
        w.encode(&mut bytes);
        assert_eq!(KeyWindow::decode(&bytes), Some(w.clone()));
        assert_eq!(
            KeyWindow::decode(&bytes[..bytes.len() - 1]),
            None,
            "truncated"
        );
        bytes.push(0);
        assert_eq!(KeyWindow::decode(&bytes), None, "trailing bytes");
        assert_eq!(KeyWindow::decode(&[9]), None, "not a window");
    }

    #[test]
    fn eviction_drops_only_panes_behind_the_horizon() {
        let window = 1600;
        let pane = KeyWindow::pane_ms(window);
        let mut w = KeyWindow::default();
        for ts in 0..1000 {
            w.insert(
                pane,
                Entry {
                    ts: ts * 10,
                    seq: ts as u64,
                    value: 1.0,
                },
            );
        }
        assert_eq!(w.len(), 1000);
        let dropped = w.evict(pane, 5000);
        assert_eq!(dropped, 500);
        assert_eq!(w.summary(pane, window, 9990).count, 160);
        assert_eq!(w.evict(pane, 5000), 0);
    }
}
