//! Exact sliding-window state for one feature and one entity key, kept as time panes.
//!
//! The window of an event at time `t` is `(t − W, t]` over the events processed so far. Events
//! are bucketed into panes of `P = W / PANES_PER_WINDOW`; each pane keeps a pre-aggregated
//! [`Summary`] and its events sorted by time. A query combines the summaries of the panes fully
//! inside the window (at most `PANES_PER_WINDOW + 1` of them, whatever the window length) and
//! looks inside only the pane cut by the left edge (binary search to the edge, then its events up
//! to the pane end), so the result is exact to the millisecond while the number of panes touched
//! does not grow with the window.
//! The pane cut by the right edge needs a look inside only when the event is out of order (some
//! events of that pane are newer than it).
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

/// One event in a pane: event time, processing sequence (ties: later processed wins), value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub ts: i64,
    pub seq: u64,
    pub value: f64,
}

/// A time bucket `[start, start + P)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pane {
    pub start: i64,
    pub summary: Summary,
    /// Sorted by `(ts, seq)`.
    pub entries: Vec<Entry>,
}

impl Pane {
    fn insert(&mut self, e: Entry) {
        self.summary.add(e.value);
        let at = match self.entries.last() {
            Some(last) if (last.ts, last.seq) > (e.ts, e.seq) => self
                .entries
                .partition_point(|x| (x.ts, x.seq) <= (e.ts, e.seq)),
            _ => self.entries.len(),
        };
        self.entries.insert(at, e);
    }

    fn max_ts(&self) -> i64 {
        self.entries.last().map_or(i64::MIN, |e| e.ts)
    }

    /// Summary of the entries with `lo < ts <= hi`.
    fn partial(&self, lo: i64, hi: i64) -> Summary {
        let from = self.entries.partition_point(|e| e.ts <= lo);
        let to = self.entries.partition_point(|e| e.ts <= hi);
        let mut s = Summary::default();
        for e in &self.entries[from..to] {
            s.add(e.value);
        }
        s
    }
}

/// The panes of one feature for one entity key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyWindow {
    pub panes: VecDeque<Pane>,
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
        self.panes.iter().map(|p| p.entries.len()).sum()
    }

    pub fn insert(&mut self, pane_ms: i64, e: Entry) {
        let start = e.ts.div_euclid(pane_ms) * pane_ms;
        let at = match self.panes.back() {
            Some(last) if last.start == start => {
                if let Some(p) = self.panes.back_mut() {
                    p.insert(e);
                }
                return;
            }
            Some(last) if last.start < start => self.panes.len(),
            None => 0,
            Some(_) => match self.panes.binary_search_by(|p| p.start.cmp(&start)) {
                Ok(i) => {
                    self.panes[i].insert(e);
                    return;
                }
                Err(i) => i,
            },
        };
        let mut pane = Pane {
            start,
            summary: Summary::default(),
            entries: Vec::with_capacity(4),
        };
        pane.insert(e);
        self.panes.insert(at, pane);
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
            let fully_inside = pane.start > lo && pane.max_ts() <= t;
            if fully_inside {
                s.merge(&pane.summary);
            } else {
                s.merge(&pane.partial(lo, t));
            }
        }
        s
    }

    /// The latest entry with `t − window < ts <= t` (ties: the one processed last).
    pub fn last(&self, window_ms: i64, t: i64) -> Option<Entry> {
        let lo = t - window_ms;
        for pane in self.panes.iter().rev() {
            if pane.start > t {
                continue;
            }
            let to = pane.entries.partition_point(|e| e.ts <= t);
            match to.checked_sub(1).map(|i| pane.entries[i]) {
                Some(e) if e.ts > lo => return Some(e),
                Some(_) => return None,
                None => {}
            }
            if pane.start <= lo {
                return None;
            }
        }
        None
    }

    /// Number of distinct values among the events with `t − window < ts <= t`. `scratch` is a
    /// reusable buffer, so a query allocates nothing once it has grown.
    pub fn count_distinct(
        &self,
        pane_ms: i64,
        window_ms: i64,
        t: i64,
        scratch: &mut Vec<u64>,
    ) -> u64 {
        let lo = t - window_ms;
        let first = self.panes.partition_point(|p| p.start + pane_ms <= lo + 1);
        scratch.clear();
        scratch.extend(
            self.panes
                .range(first..)
                .take_while(|p| p.start <= t)
                .flat_map(|p| p.entries.iter())
                .filter(|e| e.ts > lo && e.ts <= t)
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
            if p.start + pane_ms <= horizon {
                dropped += p.entries.len();
                self.panes.pop_front();
            } else {
                break;
            }
        }
        dropped
    }
}

/// Encoding of a [`KeyWindow`] for the state store (little-endian, versioned).
impl KeyWindow {
    const FORMAT: u8 = 1;

    /// Approximate heap bytes held (for the cache's memory cap).
    pub fn approx_bytes(&self) -> usize {
        64 + self.panes.len() * 96 + self.len() * std::mem::size_of::<Entry>()
    }

    /// Appends the encoding of this window to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(Self::FORMAT);
        out.extend_from_slice(&(self.panes.len() as u32).to_le_bytes());
        for p in &self.panes {
            out.extend_from_slice(&p.start.to_le_bytes());
            let s = &p.summary;
            out.extend_from_slice(&s.count.to_le_bytes());
            for v in [s.sum, s.mean, s.m2, s.min, s.max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
            for e in &p.entries {
                out.extend_from_slice(&e.ts.to_le_bytes());
                out.extend_from_slice(&e.seq.to_le_bytes());
                out.extend_from_slice(&e.value.to_le_bytes());
            }
        }
    }

    /// Decodes a window written by [`Self::encode`]; `None` if the bytes are not one.
    pub fn decode(bytes: &[u8]) -> Option<KeyWindow> {
        let mut r = Reader(bytes);
        if r.u8()? != Self::FORMAT {
            return None;
        }
        let panes = r.u32()? as usize;
        let mut w = KeyWindow {
            panes: VecDeque::with_capacity(panes),
        };
        for _ in 0..panes {
            let start = r.i64()?;
            let summary = Summary {
                count: r.u64()?,
                sum: r.f64()?,
                mean: r.f64()?,
                m2: r.f64()?,
                min: r.f64()?,
                max: r.f64()?,
            };
            let n = r.u32()? as usize;
            let mut entries = Vec::with_capacity(n.min(r.0.len() / 24));
            for _ in 0..n {
                entries.push(Entry {
                    ts: r.i64()?,
                    seq: r.u64()?,
                    value: r.f64()?,
                });
            }
            w.panes.push_back(Pane {
                start,
                summary,
                entries,
            });
        }
        r.0.is_empty().then_some(w)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
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
                    w.count_distinct(pane, window, ts, &mut Vec::new()),
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
        assert_eq!(KeyWindow::decode(&[9]), None, "unknown format");
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
