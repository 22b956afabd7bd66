//! One entity key's event log: the events that passed one `where` filter, kept once, with every
//! field the features over them read.
//!
//! Every window length over the same entity and filter reads the same log ([`crate::layout`]):
//! a query walks it once, from the newest event back to the longest length's edge, and takes
//! each length's summaries on the way ([`EventLog::summaries`]). For the keys most of a stream's
//! keys are, a few events, that walk is the whole cost of all the features of the log, however
//! many there are.
//!
//! A log of more than [`VIEWS_ABOVE`] events also keeps *views*: one [`KeyWindow`] per window
//! of the layout (a length, a field and an aggregation kind), fed by the same inserts, whose
//! indexes and edges answer queries in bounded time however many events the log holds
//! ([`crate::window`]). A log small again drops them. Views are never persisted: the events are,
//! and views are rebuilt from them when needed.
//!
//! This module holds events and answers queries; which logs and views exist is the layout's,
//! and when to evict is the operator's.

use crate::cache::{allocated, prefetch};
use crate::window::{
    get_varint, is_no_value, put_varint, unzigzag, zigzag, Entry, KeyWindow, Shape, Summary,
    NO_VALUE,
};

/// A log of more than this many events keeps views. Views cost memory (a copy of the events per
/// window: W2's 18 windows of a terminal made its record 18 times larger, and at 10M events
/// terminals no longer fit the cache and were reloaded, views rebuilt, over and over), so only
/// logs too long to walk per event keep them.
pub const VIEWS_ABOVE: usize = 512;
/// A log with views that holds at most this many events drops them.
const VIEWS_BELOW: usize = VIEWS_ABOVE / 2;

/// The events of one key that passed one filter, sorted by time (equal times in arrival order).
///
/// One buffer of 64-bit words: the ids of the log's fields, then per event its time and one
/// value per field ([`NO_VALUE`] where the event has none). Dropped events stay in front of
/// `head` until they are half the buffer, so that eviction from the front is amortized O(1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventLog {
    words: Vec<u64>,
    fields: u32,
    /// Word index of the oldest held event.
    head: usize,
    /// Time of the newest event (meaningless while empty).
    newest: i64,
    views: Option<Box<Views>>,
}

/// The indexed windows of a large log, in the order of the layout's windows (`ids`).
#[derive(Debug, Clone, PartialEq)]
struct Views {
    ids: Vec<[u8; 8]>,
    windows: Vec<KeyWindow>,
}

/// A window of the layout as a log's view: its id, shape and the field it aggregates (`None`:
/// the events themselves).
#[derive(Debug, Clone, Copy)]
pub struct ViewSpec {
    pub id: [u8; 8],
    pub shape: Shape,
    pub field: Option<usize>,
}

impl EventLog {
    /// An empty log of `fields`.
    pub fn new(fields: &[[u8; 8]]) -> Self {
        let mut log = Self::default();
        // Room for a few events: most keys hold a few, and growing from the fields' size up
        // reallocated three times before the fourth.
        log.words.reserve(fields.len() + 4 * (1 + fields.len()));
        log.words
            .extend(fields.iter().map(|f| u64::from_le_bytes(*f)));
        log.fields = fields.len() as u32;
        log.head = fields.len();
        log
    }

    fn stride(&self) -> usize {
        1 + self.fields as usize
    }

    /// The ids of the log's fields.
    pub fn fields(&self) -> impl Iterator<Item = [u8; 8]> + '_ {
        self.words[..self.fields as usize]
            .iter()
            .map(|w| w.to_le_bytes())
    }

    /// Whether the log holds exactly `fields`, in this order.
    pub fn has_fields(&self, fields: &[[u8; 8]]) -> bool {
        self.fields as usize == fields.len()
            && self.words[..fields.len()]
                .iter()
                .zip(fields)
                .all(|(w, f)| *w == u64::from_le_bytes(*f))
    }

    /// The same events over `fields`: values of fields it held are kept, fields new to it have
    /// none for the events it holds (a feature a reload adds over a new field starts empty).
    pub fn with_fields(&self, fields: &[[u8; 8]]) -> EventLog {
        let old: Vec<[u8; 8]> = self.fields().collect();
        let from: Vec<Option<usize>> = fields
            .iter()
            .map(|f| old.iter().position(|o| o == f))
            .collect();
        let mut log = EventLog::new(fields);
        log.words.reserve(self.len() * log.stride());
        for row in self.rows() {
            log.words.push(row[0]);
            log.words.extend(
                from.iter()
                    .map(|at| at.map_or(NO_VALUE.to_bits(), |i| row[1 + i])),
            );
        }
        log.newest = self.newest;
        log
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        (self.words.len() - self.head) / self.stride()
    }

    pub fn is_empty(&self) -> bool {
        self.words.len() == self.head
    }

    /// The held events, oldest first: `[time, value...]`.
    fn rows(&self) -> std::slice::ChunksExact<'_, u64> {
        self.words[self.head..].chunks_exact(self.stride())
    }

    fn ts(row: &[u64]) -> i64 {
        row[0] as i64
    }

    /// Time of the oldest event held.
    fn oldest(&self) -> Option<i64> {
        self.words.get(self.head).map(|&w| w as i64)
    }

    /// Starts loading the newest event (which the next insert and query read first) into the
    /// CPU's caches, and the views' state when there are views.
    pub fn prefetch(&self) {
        if let Some(last) = self.words.last() {
            prefetch(last);
        }
        if let Some(views) = &self.views {
            for window in &views.windows {
                window.prefetch();
            }
        }
    }

    /// Adds an event at `ts` with `values` (one per field, [`NO_VALUE`] for none); events may
    /// arrive in any time order. The views, if any, get it too; `views` describes them (the
    /// layout's windows of this log), and a log that grows past [`VIEWS_ABOVE`] builds them.
    pub fn insert(&mut self, ts: i64, values: &[f64], views: &[ViewSpec]) {
        debug_assert_eq!(values.len(), self.fields as usize);
        let stride = self.stride();
        if self.is_empty() || ts >= self.newest {
            self.newest = ts;
            self.words.push(ts as u64);
            self.words.extend(values.iter().map(|v| v.to_bits()));
        } else {
            // After every held event at or before `ts`: search from the back (late events are
            // usually only a little late).
            let rows = self.len();
            let mut at = rows;
            while at > 0 && (self.words[self.head + (at - 1) * stride] as i64) > ts {
                at -= 1;
            }
            let word = self.head + at * stride;
            self.words.splice(
                word..word,
                std::iter::once(ts as u64).chain(values.iter().map(|v| v.to_bits())),
            );
        }
        let len = self.len();
        match &mut self.views {
            Some(v) if v.fits(views) => {
                for (window, spec) in v.windows.iter_mut().zip(views) {
                    let value = spec.field.map_or(NO_VALUE, |f| values[f]);
                    if spec.field.is_none() || !is_no_value(value) {
                        window.insert(spec.shape, Entry { ts, value });
                    }
                }
            }
            _ if len > VIEWS_ABOVE => self.build_views(views),
            _ => {}
        }
    }

    /// The views for `views`, built from the events when missing or made for other windows;
    /// `None` while the log is small enough to scan.
    pub fn views(&mut self, views: &[ViewSpec]) -> Option<&mut [KeyWindow]> {
        if self.len() <= VIEWS_ABOVE && self.views.is_none() {
            return None;
        }
        if !self.views.as_ref().is_some_and(|v| v.fits(views)) {
            self.build_views(views);
        }
        let v = self.views.as_mut()?;
        for (window, spec) in v.windows.iter_mut().zip(views) {
            window.prepare(spec.shape);
        }
        Some(&mut v.windows)
    }

    fn build_views(&mut self, views: &[ViewSpec]) {
        let mut windows = Vec::with_capacity(views.len());
        for spec in views {
            let mut window = KeyWindow::default();
            for row in self.rows() {
                let value = spec.field.map_or(NO_VALUE, |f| f64::from_bits(row[1 + f]));
                if spec.field.is_none() || !is_no_value(value) {
                    window.insert(
                        spec.shape,
                        Entry {
                            ts: Self::ts(row),
                            value,
                        },
                    );
                }
            }
            windows.push(window);
        }
        self.views = Some(Box::new(Views {
            ids: views.iter().map(|v| v.id).collect(),
            windows,
        }));
    }

    /// Whether [`Self::evict`] at `horizon` may drop anything, or the views at theirs.
    pub fn can_evict(&self, horizon: i64) -> bool {
        self.oldest().is_some_and(|oldest| oldest <= horizon) || self.views.is_some()
    }

    /// Drops the events at or before `horizon` (no query can reach them any more), and from
    /// the views those at or before what `view_horizon` says for each (by position and id).
    /// Returns the events dropped from the log.
    pub fn evict(
        &mut self,
        horizon: i64,
        view_horizon: impl Fn(usize, &[u8; 8]) -> Option<i64>,
    ) -> usize {
        let stride = self.stride();
        let mut dropped = 0;
        while self.words.len() > self.head && (self.words[self.head] as i64) <= horizon {
            self.head += stride;
            dropped += 1;
        }
        let fields = self.fields as usize;
        if dropped > 0 && self.head - fields >= (self.words.len() - fields) / 2 {
            self.words.drain(fields..self.head);
            self.head = fields;
            // Keep small buffers for the key's next events; give large ones back.
            if self.words.capacity() > 256 && self.words.len() < self.words.capacity() / 4 {
                self.words.shrink_to(self.words.len() * 2);
            }
        }
        if self.len() <= VIEWS_BELOW {
            self.views = None;
        } else if let Some(views) = &mut self.views {
            for (at, (id, window)) in views.ids.iter().zip(&mut views.windows).enumerate() {
                if let Some(h) = view_horizon(at, id) {
                    window.evict(h);
                }
            }
        }
        dropped
    }

    /// Summaries at time `t` of the fields `summed` (indexes of fields) over the events with
    /// `t − lengths[i] < ts <= t`, for every `i`: `out[i * summed.len() + j]` for field
    /// `summed[j]`, and `events[i]` the number of those events. `lengths` ascending. One walk
    /// from the newest event back to the longest length's edge.
    pub fn summaries(
        &self,
        t: i64,
        lengths: &[i64],
        summed: &[usize],
        moments: bool,
        out: &mut Vec<Summary>,
        events: &mut Vec<u64>,
    ) {
        let width = summed.len();
        // The running summaries after the lengths' slots.
        let acc_at = lengths.len() * width;
        out.clear();
        out.resize(acc_at + width, Summary::default());
        events.clear();
        events.resize(lengths.len(), 0);
        let mut open = 0;
        let mut held = 0u64;
        let mut close_through = |ts: i64, open: &mut usize, held: u64, out: &mut [Summary]| {
            while *open < lengths.len() && ts <= t - lengths[*open] {
                let (slots, acc) = out.split_at_mut(acc_at);
                slots[*open * width..(*open + 1) * width].copy_from_slice(acc);
                events[*open] = held;
                *open += 1;
            }
        };
        for row in self.rows().rev() {
            let ts = Self::ts(row);
            if ts > t {
                continue;
            }
            close_through(ts, &mut open, held, out);
            if open == lengths.len() {
                break;
            }
            held += 1;
            for (s, &f) in out[acc_at..].iter_mut().zip(summed) {
                s.add(f64::from_bits(row[1 + f]), moments);
            }
        }
        close_through(i64::MIN, &mut open, held, out);
        out.truncate(acc_at);
    }

    /// Numbers of distinct values of `field` among the events with `t − lengths[i] < ts <= t`,
    /// for every `i` (`lengths` ascending), appended to `out`; one walk. `seen` is a reusable
    /// set.
    pub fn distinct_counts(
        &self,
        field: usize,
        t: i64,
        lengths: &[i64],
        seen: &mut hashbrown::HashSet<u64>,
        out: &mut Vec<u64>,
    ) {
        seen.clear();
        let mut open = 0;
        for row in self.rows().rev() {
            let ts = Self::ts(row);
            if ts > t {
                continue;
            }
            while open < lengths.len() && ts <= t - lengths[open] {
                out.push(seen.len() as u64);
                open += 1;
            }
            if open == lengths.len() {
                return;
            }
            let v = row[1 + field];
            if v != NO_VALUE.to_bits() {
                seen.insert(v);
            }
        }
        while open < lengths.len() {
            out.push(seen.len() as u64);
            open += 1;
        }
    }

    /// The latest event with `t − window < ts <= t` (ties: the one processed last) that has a
    /// value of `field` (`None`: any event), as `(time, value)`.
    pub fn last(&self, field: Option<usize>, window_ms: i64, t: i64) -> Option<(i64, f64)> {
        for row in self.rows().rev() {
            let ts = Self::ts(row);
            if ts > t {
                continue;
            }
            if ts <= t - window_ms {
                return None;
            }
            let value = field.map_or(NO_VALUE, |f| f64::from_bits(row[1 + f]));
            if field.is_none() || !is_no_value(value) {
                return Some((ts, value));
            }
        }
        None
    }

    /// Approximate heap bytes held (for the cache's memory cap).
    pub fn approx_bytes(&self) -> usize {
        allocated(self.words.capacity() * 8)
            + self.views.as_ref().map_or(0, |v| {
                allocated(std::mem::size_of::<Views>())
                    + allocated(v.ids.capacity() * 8)
                    + allocated(v.windows.capacity() * std::mem::size_of::<KeyWindow>())
                    + v.windows.iter().map(KeyWindow::approx_bytes).sum::<usize>()
            })
    }

    /// About the length of [`Self::encode`]'s output (times taken as three bytes each, what
    /// most gaps between a key's events take).
    pub fn encoded_len_hint(&self) -> usize {
        2 + self.fields as usize * 8 + 3 + self.len() * (3 + 8 * self.fields as usize)
    }

    /// Appends the encoding of this log to `out`: the number of fields (varint) and their ids, the
    /// number of events, then each event as its time's difference from the previous one
    /// (zigzag varint) and its values (8 bytes LE each).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len_hint());
        put_varint(out, self.fields as u64);
        for f in self.fields() {
            out.extend_from_slice(&f);
        }
        put_varint(out, self.len() as u64);
        let mut prev = 0i64;
        for row in self.rows() {
            let ts = Self::ts(row);
            put_varint(out, zigzag(ts.wrapping_sub(prev)));
            for v in &row[1..] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            prev = ts;
        }
    }

    /// Decodes a log written by [`Self::encode`] from the front of `bytes`, advancing it;
    /// `None` if the bytes are not one (truncated, or events out of time order).
    pub fn decode_from(bytes: &mut &[u8]) -> Option<EventLog> {
        let fields = usize::try_from(get_varint(bytes)?).ok()?;
        if fields > bytes.len() / 8 {
            return None;
        }
        let mut ids = Vec::with_capacity(fields);
        for _ in 0..fields {
            let (id, rest) = bytes.split_first_chunk::<8>()?;
            ids.push(*id);
            *bytes = rest;
        }
        let mut log = EventLog::new(&ids);
        let n = usize::try_from(get_varint(bytes)?).ok()?;
        // Each event takes at least 1 + 8 × fields bytes: refuse counts the input cannot hold.
        if n > bytes.len() / (1 + 8 * fields) {
            return None;
        }
        log.words.reserve(n * log.stride());
        let mut prev = 0i64;
        for i in 0..n {
            let ts = prev.wrapping_add(unzigzag(get_varint(bytes)?));
            if i > 0 && ts < prev {
                return None;
            }
            log.words.push(ts as u64);
            for _ in 0..fields {
                let (v, rest) = bytes.split_first_chunk::<8>()?;
                *bytes = rest;
                log.words.push(u64::from_le_bytes(*v));
            }
            prev = ts;
        }
        log.newest = prev;
        Some(log)
    }
}

impl Views {
    fn fits(&self, views: &[ViewSpec]) -> bool {
        self.ids.len() == views.len() && self.ids.iter().zip(views).all(|(id, v)| *id == v.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so that failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    const LENGTHS: [i64; 4] = [50, 400, 3_000, 20_000];

    fn views() -> Vec<ViewSpec> {
        let mut specs = Vec::new();
        for (i, &len) in LENGTHS.iter().enumerate() {
            for field in [None, Some(0), Some(1)] {
                specs.push(ViewSpec {
                    id: [i as u8, field.map_or(9, |f| f as u8), 0, 0, 0, 0, 0, 0],
                    shape: Shape::new(len, true),
                    field,
                });
            }
        }
        specs
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
            _ => false,
        }
    }

    /// Feeds a stream (gaps, disorder, bursts of equal times, NULL values) into a log and checks
    /// every length's summaries, distinct counts and latest events after every insert against
    /// the definition computed from all events so far; with the views of a large log as well
    /// as with the walk. Eviction runs with a horizon that trails the stream as in the operator.
    fn check(seed: u64, n: usize, gap: u64, disorder: u64) {
        let mut rng = Rng(seed);
        let specs = views();
        let mut log = EventLog::new(&[[1; 8], [2; 8]]);
        let mut seen: Vec<(i64, f64, f64)> = Vec::new();
        let mut t = 1_000_000i64;
        let (mut sums, mut counts) = (Vec::new(), Vec::new());
        let mut set = hashbrown::HashSet::new();
        let mut used_views = false;
        for _ in 0..n {
            t += rng.next(gap) as i64;
            let ts = t - rng.next(disorder + 1) as i64;
            let amount = if rng.next(10) == 0 {
                NO_VALUE
            } else {
                rng.next(1000) as f64 / 10.0
            };
            let tag = rng.next(7) as f64;
            let horizon = t - disorder as i64 - 10;
            let reach = horizon - LENGTHS[3];
            log.evict(reach, |at, id| {
                let spec = specs.get(at).filter(|s| s.id == *id)?;
                Some(horizon - spec.shape.window_ms)
            });
            log.insert(ts, &[amount, tag], &specs);
            seen.push((ts, amount, tag));

            let inside = |len: i64| seen.iter().filter(move |e| e.0 <= ts && e.0 > ts - len);
            match log.views(&specs) {
                Some(views) => {
                    used_views = true;
                    for (spec, view) in specs.iter().zip(views) {
                        let len = spec.shape.window_ms;
                        let s = view.summary(spec.shape, ts);
                        let want: Vec<f64> = match spec.field {
                            None => inside(len).map(|_| NO_VALUE).collect(),
                            Some(0) => inside(len)
                                .map(|e| e.1)
                                .filter(|v| !is_no_value(*v))
                                .collect(),
                            _ => inside(len).map(|e| e.2).collect(),
                        };
                        assert_eq!(s.events as usize, want.len(), "seed {seed} view {spec:?}");
                        if spec.field == Some(0) {
                            let sum: f64 = want.iter().sum();
                            assert!(close(s.sum(), (!want.is_empty()).then_some(sum)));
                        }
                    }
                }
                None => {
                    log.summaries(ts, &LENGTHS, &[0], true, &mut sums, &mut counts);
                    let mut distinct = Vec::new();
                    log.distinct_counts(1, ts, &LENGTHS, &mut set, &mut distinct);
                    for (i, &len) in LENGTHS.iter().enumerate() {
                        let events = inside(len).count();
                        let values: Vec<f64> = inside(len)
                            .map(|e| e.1)
                            .filter(|v| !is_no_value(*v))
                            .collect();
                        assert_eq!(counts[i] as usize, events, "seed {seed} length {len}");
                        let s = &sums[i];
                        assert_eq!(s.count as usize, values.len());
                        let sum: f64 = values.iter().sum();
                        assert!(close(s.sum(), (!values.is_empty()).then_some(sum)));
                        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        assert!(close(s.max(), (!values.is_empty()).then_some(max)));
                        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                        assert!(close(s.min(), (!values.is_empty()).then_some(min)));
                        if values.len() > 1 {
                            let mean = sum / values.len() as f64;
                            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                                / (values.len() - 1) as f64;
                            assert!(close(s.stddev(), Some(var.sqrt())), "seed {seed}");
                        }
                        let mut tags: Vec<u64> = inside(len).map(|e| e.2.to_bits()).collect();
                        tags.sort_unstable();
                        tags.dedup();
                        assert_eq!(distinct[i] as usize, tags.len());
                        // The latest event with an amount (ties: the one added last).
                        let last = inside(len).filter(|e| !is_no_value(e.1)).fold(
                            None::<(i64, f64, f64)>,
                            |best, e| match best {
                                Some(b) if b.0 > e.0 => Some(b),
                                _ => Some(*e),
                            },
                        );
                        assert_eq!(log.last(Some(0), len, ts), last.map(|e| (e.0, e.1)));
                    }
                }
            }
        }
        // A dense stream must have crossed into views at some point, a sparse one never.
        assert_eq!(used_views, gap < 100, "seed {seed}");
    }

    #[test]
    fn a_sparse_log_answers_every_length_in_one_walk() {
        for seed in 1..6 {
            check(seed, 400, 3_000, 0);
            check(seed + 100, 400, 2_000, 500);
        }
    }

    #[test]
    fn a_dense_log_answers_from_views_like_the_walk() {
        for seed in 1..4 {
            check(seed, 3_000, 20, 0);
            check(seed + 100, 3_000, 20, 60);
        }
    }

    #[test]
    fn logs_survive_encoding_and_a_change_of_fields() {
        let mut log = EventLog::new(&[[1; 8], [2; 8]]);
        for (ts, a, b) in [(5, 1.0, 2.0), (3, NO_VALUE, 4.0), (9, 5.0, 6.0)] {
            log.insert(ts, &[a, b], &[]);
        }
        let mut bytes = Vec::new();
        log.encode(&mut bytes);
        let mut at = &bytes[..];
        let back = EventLog::decode_from(&mut at).expect("decodes");
        assert!(at.is_empty());
        assert_eq!(back, log);
        assert!(EventLog::decode_from(&mut &bytes[..bytes.len() - 1]).is_none());
        // More fields than a byte counts.
        let ids: Vec<[u8; 8]> = (0..300u16)
            .map(|i| [(i >> 8) as u8, i as u8, 0, 0, 0, 0, 0, 7])
            .collect();
        let mut wide = EventLog::new(&ids);
        wide.insert(1, &vec![2.5; 300], &[]);
        bytes.clear();
        wide.encode(&mut bytes);
        assert_eq!(EventLog::decode_from(&mut &bytes[..]), Some(wide));

        // Field 2 dropped, field 3 new: the events stay, with no values of the new field.
        let changed = log.with_fields(&[[3; 8], [1; 8]]);
        assert!(changed.has_fields(&[[3; 8], [1; 8]]));
        assert_eq!(changed.len(), 3);
        assert_eq!(changed.last(Some(0), 100, 9), None);
        assert_eq!(changed.last(Some(1), 100, 9), Some((9, 5.0)));
        assert_eq!(changed.last(Some(1), 100, 4), None, "time 3 has no amount");
        assert_eq!(changed.last(None, 100, 4).map(|(t, _)| t), Some(3));
    }
}
