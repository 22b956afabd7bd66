//! Exact sliding-window state for one window and one entity key.
//!
//! The window of an event at time `t` is `(t − W, t]` over the events processed so far. A window
//! keeps its events once, sorted by time (equal times in arrival order), as 16-byte [`Entry`]s.
//! A window of at most [`SPLIT_ABOVE`] events answers a query by scanning them. A larger one
//! also keeps an index of pre-aggregated time buckets: panes of `W / 16`, and inside any pane
//! (or sub-pane) that holds more than [`SPLIT_ABOVE`] events, sixteen sub-panes, recursively;
//! plus the running summaries of the panes from each one to the newest.
//!
//! A query in time order (the common case) reads one running summary and the newest pane, and
//! descends only into the pane its left edge cuts, down to a leaf of at most [`SPLIT_ABOVE`]
//! events (or one millisecond, which an edge cannot cut); a query out of order also merges the
//! panes in between and descends at its right edge. Either way it is exact to the millisecond,
//! touches a bounded number of summaries and scans at most `2 × SPLIT_ABOVE` events, whatever
//! the window length or the key's event rate (the depth of sub-panes grows only
//! logarithmically with the events in one pane). Keys with few events, most of them, carry no
//! index at all.
//!
//! Queries in time order need not search at all. A window of more than [`EDGE_ABOVE`] events
//! remembers where the last one's left edge fell ([`Edge`]): a copy of the (at most
//! [`EDGE_CHUNK`]) events from there on, a cursor into it, and the summary of every event after
//! the chunk, which in-order inserts extend. The next in-order query moves the cursor past the
//! events that left the window, scans what is left of the chunk and merges the summary; only
//! when the chunk is used up does it summarize the events after a new chunk (by the index, or
//! by a scan of a small window). So an in-order query touches the same few cache lines whatever
//! the window's length or the events in it, and does the bounded index query above once per
//! [`EDGE_CHUNK`] events that leave the window. Inserts in time order leave the index alone
//! too: they are added to it, all at once, before it is next read.
//!
//! `count_distinct` cannot be pre-aggregated; a large window instead keeps the multiset of the
//! values in the window it last answered for and moves it to the next query's window by adding
//! and removing the events in between, which costs O(1) amortized as queries move forward.
//!
//! Eviction drops whole panes that end at or before a horizon. Persisted windows hold their
//! events only ([`KeyWindow::encode`]); the indexes are rebuilt when needed.

use std::collections::VecDeque;

use hashbrown::HashMap;

use crate::cache::{allocated, prefetch, prefetch_all};

/// Panes per window length.
pub const PANES_PER_WINDOW: i64 = 16;
/// Sub-buckets per bucket when a bucket is split.
const FANOUT: i64 = 16;
/// A window or bucket with more events than this is indexed or split; queries scan at most this
/// many events at each edge.
pub const SPLIT_ABOVE: usize = 64;

/// A window of more than this many events keeps an [`Edge`] for queries in time order.
pub const EDGE_ABOVE: usize = 16;
/// Events an [`Edge`]'s chunk starts with.
const EDGE_CHUNK: usize = 16;

/// One event of a window: event time (epoch ms) and the aggregated value, or [`NO_VALUE`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub ts: i64,
    pub value: f64,
}

/// The value of an event that has none (the window aggregates no field, or the event's field is
/// NULL): it counts as an event but not as a value. One particular NaN, compared by its bits, so
/// that hashed values (which may be any bit pattern) are told apart from it.
pub const NO_VALUE: f64 = f64::from_bits(0x7ff8_6e6f_7661_6c75);

/// Whether `v` is [`NO_VALUE`].
pub fn is_no_value(v: f64) -> bool {
    v.to_bits() == NO_VALUE.to_bits()
}

/// How a feature looks at its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub window_ms: i64,
    pub pane_ms: i64,
    /// Keep the second moment in summaries (only `stddev` needs it).
    pub moments: bool,
}

impl Shape {
    pub fn new(window_ms: i64, moments: bool) -> Self {
        Self {
            window_ms,
            pane_ms: (window_ms / PANES_PER_WINDOW).max(1),
            moments,
        }
    }
}

/// Mergeable statistics of a set of events and their values (Chan et al. for the second moment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Events, with or without a value.
    pub events: u64,
    /// Values (events with one).
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Sum of squared deviations from the mean; maintained only with `moments`.
    m2: f64,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            events: 0,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            m2: 0.0,
        }
    }
}

impl Summary {
    pub fn add(&mut self, v: f64, moments: bool) {
        self.events += 1;
        if is_no_value(v) {
            return;
        }
        if moments && self.count > 0 {
            let before = self.sum / self.count as f64;
            let after = (self.sum + v) / (self.count + 1) as f64;
            self.m2 += (v - before) * (v - after);
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Summary, moments: bool) {
        self.events += o.events;
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            let events = self.events;
            *self = *o;
            self.events = events;
            return;
        }
        if moments {
            let (na, nb) = (self.count as f64, o.count as f64);
            let delta = o.sum / nb - self.sum / na;
            self.m2 += o.m2 + delta * delta * na * nb / (na + nb);
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// SQL `SUM`: `None` for an empty set.
    pub fn sum(&self) -> Option<f64> {
        (self.count > 0).then_some(self.sum)
    }

    /// `sum / count`, or `None` for an empty set.
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Sample standard deviation (n − 1), or `None` below two values. Needs `moments`.
    ///
    /// Not inlined: inlined, the compiler computed the division and square root for every
    /// summary a query appended, ahead of the test of whether any reader wanted a standard
    /// deviation (both are safe to run speculatively), and the square roots' latency was
    /// 7 % of the scorer's time on W2, where 12 of 200 features are one.
    #[inline(never)]
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

/// A time bucket `[start, end)` (its end follows from its parent): the summary of its events,
/// their time range, and — once it held more than [`SPLIT_ABOVE`] events — its non-empty
/// sub-buckets, sorted by start.
#[derive(Debug, Clone, PartialEq)]
struct Bucket {
    start: i64,
    min_ts: i64,
    max_ts: i64,
    summary: Summary,
    children: Vec<Bucket>,
}

/// Width of the sub-buckets of a bucket `width` long.
fn child_width(width: i64) -> i64 {
    (width + FANOUT - 1) / FANOUT
}

/// The start of the bucket of width `width`, aligned at `origin`, that holds `ts`.
fn bucket_start(origin: i64, width: i64, ts: i64) -> i64 {
    origin + (ts - origin).div_euclid(width) * width
}

impl Bucket {
    fn new(start: i64) -> Self {
        Self {
            start,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
            summary: Summary::default(),
            children: Vec::new(),
        }
    }

    fn take(&mut self, e: Entry, moments: bool) {
        self.summary.add(e.value, moments);
        self.min_ts = self.min_ts.min(e.ts);
        self.max_ts = self.max_ts.max(e.ts);
    }

    /// Buckets in this subtree.
    fn size(&self) -> usize {
        1 + self.children.iter().map(Bucket::size).sum::<usize>()
    }

    /// Adds `e` (already in `entries`) to this bucket `[start, end)` and the sub-buckets it
    /// falls in, splitting a leaf that grows past [`SPLIT_ABOVE`]. The index holds the first
    /// `upto` entries once `e` is added (a split must not take events it does not hold yet).
    /// Returns buckets created.
    fn add(
        &mut self,
        end: i64,
        e: Entry,
        moments: bool,
        entries: &VecDeque<Entry>,
        upto: usize,
    ) -> usize {
        self.take(e, moments);
        let width = end - self.start;
        if width <= 1 {
            return 0;
        }
        if self.children.is_empty() {
            return if self.summary.events as usize > SPLIT_ABOVE {
                self.split(end, moments, entries, upto)
            } else {
                0
            };
        }
        let cw = child_width(width);
        let start = bucket_start(self.start, cw, e.ts);
        let child_end = (start + cw).min(end);
        let (at, created) = match self.children.binary_search_by_key(&start, |c| c.start) {
            Ok(at) => (at, 0),
            Err(at) => {
                self.children.insert(at, Bucket::new(start));
                (at, 1)
            }
        };
        created + self.children[at].add(child_end, e, moments, entries, upto)
    }

    /// Builds the sub-buckets of this bucket `[start, end)` from its events among the first
    /// `upto` entries, splitting those that are still too large. Returns buckets created.
    fn split(&mut self, end: i64, moments: bool, entries: &VecDeque<Entry>, upto: usize) -> usize {
        let cw = child_width(end - self.start);
        let from = entries.partition_point(|x| x.ts < self.start).min(upto);
        self.children.clear();
        for e in entries.range(from..upto).take_while(|x| x.ts < end) {
            let start = bucket_start(self.start, cw, e.ts);
            match self.children.last_mut() {
                Some(last) if last.start == start => last.take(*e, moments),
                _ => {
                    let mut child = Bucket::new(start);
                    child.take(*e, moments);
                    self.children.push(child);
                }
            }
        }
        let mut created = self.children.len();
        for child in &mut self.children {
            let child_end = (child.start + cw).min(end);
            if child.summary.events as usize > SPLIT_ABOVE && child_end - child.start > 1 {
                created += child.split(child_end, moments, entries, upto);
            }
        }
        created
    }

    /// Merges into `out` the events of this bucket `[start, end)` with `lo < ts <= hi`.
    fn query(
        &self,
        end: i64,
        lo: i64,
        hi: i64,
        moments: bool,
        entries: &VecDeque<Entry>,
        out: &mut Summary,
    ) {
        if self.max_ts <= lo || self.min_ts > hi {
            return;
        }
        if self.min_ts > lo && self.max_ts <= hi {
            out.merge(&self.summary, moments);
            return;
        }
        if self.children.is_empty() {
            // A leaf: at most SPLIT_ABOVE events (a one-millisecond bucket is never cut).
            scan(
                entries,
                lo.max(self.start - 1),
                hi.min(end - 1),
                moments,
                out,
            );
            return;
        }
        let cw = child_width(end - self.start);
        let first = self.children.partition_point(|c| c.max_ts <= lo);
        for child in &self.children[first..] {
            if child.min_ts > hi {
                break;
            }
            child.query((child.start + cw).min(end), lo, hi, moments, entries, out);
        }
    }
}

/// `items.partition_point(before)` (the number of leading items for which `before` holds, the
/// items being partitioned that way), searched outward from the front or the back: it probes
/// O(log d) items for a boundary d items from that end, all of them near it. Window queries look
/// for boundaries near an end — the left edge near the oldest events kept, the right edge near
/// the newest — so this touches a few cache lines where a plain binary search touches many.
fn boundary<T>(items: &VecDeque<T>, from_back: bool, before: impl Fn(&T) -> bool) -> usize {
    let n = items.len();
    // The boundary lies in [lo, hi].
    let (mut lo, mut hi) = (0, n);
    let mut step = 1;
    if from_back {
        while hi > 0 {
            let i = hi.saturating_sub(step);
            if before(&items[i]) {
                lo = i + 1;
                break;
            }
            hi = i;
            step *= 2;
        }
    } else {
        while lo < n {
            let i = (lo + step - 1).min(n - 1);
            if !before(&items[i]) {
                hi = i;
                break;
            }
            lo = i + 1;
            step *= 2;
        }
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(&items[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The number of entries with `ts <= t`, searched from the end nearer to `t`.
fn count_through(entries: &VecDeque<Entry>, t: i64) -> usize {
    let (Some(front), Some(back)) = (entries.front(), entries.back()) else {
        return 0;
    };
    let from_back = back.ts.saturating_sub(t) < t.saturating_sub(front.ts);
    boundary(entries, from_back, |e| e.ts <= t)
}

/// Merges into `out` the entries with `lo < ts <= hi`.
fn scan(entries: &VecDeque<Entry>, lo: i64, hi: i64, moments: bool, out: &mut Summary) {
    let from = count_through(entries, lo);
    for e in entries.range(from..).take_while(|e| e.ts <= hi) {
        out.add(e.value, moments);
    }
}

/// The values of the events with `lo < ts <= hi`, with their multiplicities.
#[derive(Debug, Clone, Default, PartialEq)]
struct Distinct {
    lo: i64,
    hi: i64,
    counts: HashMap<u64, u32>,
}

impl Distinct {
    fn add(&mut self, value: f64) {
        *self.counts.entry(value.to_bits()).or_insert(0) += 1;
    }

    fn remove(&mut self, value: f64) {
        if let hashbrown::hash_map::Entry::Occupied(mut slot) = self.counts.entry(value.to_bits()) {
            *slot.get_mut() -= 1;
            if *slot.get() == 0 {
                slot.remove();
            }
        }
    }

    /// Applies `f` to the values of the entries with `lo < ts <= hi` (not to [`NO_VALUE`]s).
    fn each(entries: &VecDeque<Entry>, lo: i64, hi: i64, mut f: impl FnMut(f64)) {
        if lo >= hi {
            return;
        }
        let from = count_through(entries, lo);
        for e in entries.range(from..).take_while(|e| e.ts <= hi) {
            if !is_no_value(e.value) {
                f(e.value);
            }
        }
    }

    /// Moves to the window `(lo, hi]`.
    fn move_to(&mut self, entries: &VecDeque<Entry>, lo: i64, hi: i64) {
        let (a, b) = (self.lo, self.hi);
        if hi <= a || lo >= b {
            // Disjoint: start over.
            self.counts.clear();
            Self::each(entries, lo, hi, |v| self.add(v));
        } else {
            Self::each(entries, lo, a, |v| self.add(v));
            Self::each(entries, a, lo, |v| self.remove(v));
            Self::each(entries, b, hi, |v| self.add(v));
            Self::each(entries, hi, b, |v| self.remove(v));
        }
        self.lo = lo;
        self.hi = hi;
    }
}

/// The pane index of a window that holds more than [`SPLIT_ABOVE`] events.
#[derive(Debug, Clone, PartialEq)]
struct PaneIndex {
    /// Top-level panes, sorted by start.
    panes: VecDeque<Bucket>,
    /// `suffix[i]` summarizes `panes[i..len − 1]` (all but the newest pane), so that a query
    /// in time order merges one summary for the panes between its edges.
    suffix: VecDeque<Summary>,
    /// Buckets at all levels (for the memory estimate).
    buckets: usize,
    /// The shape the index was built for (whether its summaries keep the second moment).
    shape: Shape,
    /// The newest entries, appended in time order, that the index does not hold yet: an
    /// insert in order only counts itself here, so that it touches neither the newest pane
    /// nor the suffix summaries, and [`Self::catch_up`] adds them all when the index is next
    /// read ([`Self::query`] and [`Self::evict`] do so first). Most queries in time order are answered by the edge and never read the index.
    unindexed: usize,
}

impl PaneIndex {
    /// An index over `entries`.
    fn build(shape: Shape, entries: &VecDeque<Entry>) -> Self {
        let p = shape.pane_ms;
        let mut panes: VecDeque<Bucket> = VecDeque::new();
        for e in entries {
            let start = bucket_start(0, p, e.ts);
            match panes.back_mut() {
                Some(last) if last.start == start => last.take(*e, shape.moments),
                _ => {
                    let mut pane = Bucket::new(start);
                    pane.take(*e, shape.moments);
                    panes.push_back(pane);
                }
            }
        }
        let mut buckets = panes.len();
        for pane in &mut panes {
            if pane.summary.events as usize > SPLIT_ABOVE && p > 1 {
                buckets += pane.split(pane.start + p, shape.moments, entries, entries.len());
            }
        }
        let mut index = PaneIndex {
            panes,
            suffix: VecDeque::new(),
            buckets,
            shape,
            unindexed: 0,
        };
        index.rebuild_suffix();
        index
    }

    /// Adds the entries appended since the index last held them all.
    fn catch_up(&mut self, entries: &VecDeque<Entry>) {
        let from = entries.len().saturating_sub(self.unindexed);
        self.unindexed = 0;
        for at in from..entries.len() {
            self.add(entries[at], entries, at + 1);
        }
    }

    /// Adds `e`, already in `entries`, of which the index then holds the first `upto` (all but
    /// any appended after `e`). Call with nothing left to [`Self::catch_up`].
    fn add(&mut self, e: Entry, entries: &VecDeque<Entry>, upto: usize) {
        let shape = self.shape;
        let p = shape.pane_ms;
        let start = bucket_start(0, p, e.ts);
        let at = match self.panes.back() {
            Some(last) if last.start == start => self.panes.len() - 1,
            Some(last) if last.start < start => {
                // A new newest pane: the previous one joins the suffix summaries.
                let previous = last.summary;
                for s in &mut self.suffix {
                    s.merge(&previous, shape.moments);
                }
                self.suffix.push_back(previous);
                self.panes.push_back(Bucket::new(start));
                self.buckets += 1;
                self.panes.len() - 1
            }
            None => {
                self.panes.push_back(Bucket::new(start));
                self.buckets += 1;
                0
            }
            Some(_) => match self.panes.binary_search_by_key(&start, |b| b.start) {
                Ok(at) => at,
                Err(at) => {
                    self.panes.insert(at, Bucket::new(start));
                    self.buckets += 1;
                    at
                }
            },
        };
        self.buckets += self.panes[at].add(start + p, e, shape.moments, entries, upto);
        if at + 1 < self.panes.len() {
            // An older pane changed (an event out of order).
            self.rebuild_suffix();
        }
    }

    fn rebuild_suffix(&mut self) {
        self.suffix.clear();
        let mut acc = Summary::default();
        for pane in self.panes.range(..self.panes.len().saturating_sub(1)).rev() {
            acc.merge(&pane.summary, self.shape.moments);
            self.suffix.push_front(acc);
        }
    }

    /// Merges into `out` the events with `lo < ts <= t`; `newest` is the newest event's time.
    fn query(
        &mut self,
        lo: i64,
        t: i64,
        newest: i64,
        entries: &VecDeque<Entry>,
        out: &mut Summary,
    ) {
        self.catch_up(entries);
        let shape = self.shape;
        let p = shape.pane_ms;
        let first = boundary(&self.panes, false, |b| b.max_ts <= lo);
        let Some(last) = self.panes.len().checked_sub(1) else {
            return;
        };
        if t >= newest && first <= last {
            // In time order: the right edge cuts nothing. Descend into the pane the left edge
            // cuts; the panes after it are whole: a suffix summary and the newest pane.
            let pane = &self.panes[first];
            let whole_from = if pane.min_ts > lo {
                first
            } else {
                pane.query(pane.start + p, lo, t, shape.moments, entries, out);
                first + 1
            };
            if whole_from < last {
                out.merge(&self.suffix[whole_from], shape.moments);
            }
            if whole_from <= last {
                out.merge(&self.panes[last].summary, shape.moments);
            }
            return;
        }
        for pane in self.panes.range(first..) {
            if pane.min_ts > t {
                break;
            }
            pane.query(pane.start + p, lo, t, shape.moments, entries, out);
        }
    }

    /// Drops the panes whose events are all at or before `horizon`; returns the events in them
    /// (the first that many entries of `entries`).
    fn evict(&mut self, horizon: i64, entries: &VecDeque<Entry>) -> usize {
        self.catch_up(entries);
        let mut dropped = 0;
        while let Some(pane) = self.panes.front() {
            if pane.max_ts > horizon {
                break;
            }
            dropped += pane.summary.events as usize;
            self.buckets -= pane.size();
            self.panes.pop_front();
            self.suffix.pop_front();
        }
        dropped
    }

    fn approx_bytes(&self) -> usize {
        allocated(std::mem::size_of::<Self>())
            + allocated(self.buckets * std::mem::size_of::<Bucket>())
            + allocated(self.suffix.capacity() * std::mem::size_of::<Summary>())
    }
}

/// Where the left edge of the last query in time order fell (see the module's documentation).
///
/// The edge keeps a copy of its chunk, the events from where it was built on, so that a query
/// reads only the edge (one allocation, prefetched with the window) and not the events at the
/// window's far end. Every event after the chunk has a time of at least `chunk_last` (the time
/// of the chunk's last event), so while some event of the chunk is inside a window, all of them
/// are: `rest` summarizes them. An insert at or after `chunk_last` lands after the chunk and
/// joins `rest`; one before it shifts the chunk, and the edge is dropped (rebuilt by the next
/// in-order query). Eviction drops events from the front only: while it drops none after the
/// chunk, the edge holds (a query never reaches back to what eviction dropped).
#[derive(Debug, Clone, PartialEq)]
struct Edge {
    /// The first event of the chunk inside the last window asked about (`len` if none is).
    cursor: u8,
    len: u8,
    /// Whether `rest` keeps the second moment.
    moments: bool,
    /// No event before the chunk is later than this (`i64::MIN` if there was none).
    before: i64,
    /// Where the chunk ends among the window's events.
    chunk_end: usize,
    chunk_last: i64,
    /// The events after the chunk.
    rest: Summary,
    chunk: [Entry; EDGE_CHUNK],
}

impl Edge {
    /// An edge at `lo` over `entries` (the events with `ts > lo` from the chunk on).
    fn build(
        shape: Shape,
        lo: i64,
        entries: &VecDeque<Entry>,
        index: Option<&mut PaneIndex>,
        newest: i64,
    ) -> Self {
        let from = count_through(entries, lo);
        let chunk_end = (from + EDGE_CHUNK).min(entries.len());
        let mut chunk = [Entry {
            ts: i64::MIN,
            value: NO_VALUE,
        }; EDGE_CHUNK];
        for (slot, e) in chunk.iter_mut().zip(entries.range(from..chunk_end)) {
            *slot = *e;
        }
        let len = chunk_end - from;
        let chunk_last = match len.checked_sub(1) {
            Some(last) => chunk[last].ts,
            None => i64::MIN,
        };
        let mut rest = Summary::default();
        match index {
            Some(index) if len > 0 => {
                // The events after the chunk: those later than its last one, by the index, and
                // those at the same time that arrived after it.
                for e in entries
                    .range(chunk_end..)
                    .take_while(|e| e.ts == chunk_last)
                {
                    rest.add(e.value, shape.moments);
                }
                index.query(chunk_last, newest, newest, entries, &mut rest);
            }
            _ => {
                for e in entries.range(chunk_end..) {
                    rest.add(e.value, shape.moments);
                }
            }
        }
        Self {
            cursor: 0,
            // EDGE_CHUNK fits a byte.
            len: len as u8,
            moments: shape.moments,
            before: from.checked_sub(1).map_or(i64::MIN, |at| entries[at].ts),
            chunk_end,
            chunk_last,
            rest,
            chunk,
        }
    }

    /// Moves the cursor to the first event of the chunk later than `lo`; `None` if the window
    /// `(lo, …]` does not start inside the chunk (the edge must be rebuilt).
    fn advance(&mut self, lo: i64) -> Option<()> {
        let (mut at, len) = (self.cursor as usize, self.len as usize);
        while at < len && self.chunk[at].ts <= lo {
            at += 1;
        }
        // A query may reach back further than the last (an event its window does not hold).
        while at > 0 && self.chunk[at - 1].ts > lo {
            at -= 1;
        }
        self.cursor = at as u8;
        (at < len && (at > 0 || self.before <= lo)).then_some(())
    }

    /// The events from the cursor on.
    fn summary(&self, moments: bool) -> Summary {
        let mut out = Summary::default();
        for e in &self.chunk[self.cursor as usize..self.len as usize] {
            out.add(e.value, moments);
        }
        out.merge(&self.rest, moments);
        out
    }
}

/// The state of one window for one entity key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyWindow {
    /// Every event, sorted by time; equal times in arrival order.
    entries: VecDeque<Entry>,
    /// Eviction drops nothing while its horizon is below this (a lower bound of the oldest
    /// entry's time, or of the oldest pane's newest time once indexed), and the newest entry's
    /// time: kept here so that the common cases of eviction and insertion need not look at
    /// either end of `entries`. Meaningless while the window is empty.
    evictable_at: i64,
    newest: i64,
    /// Once the window holds more than [`SPLIT_ABOVE`] events.
    index: Option<Box<PaneIndex>>,
    /// What the last query left for the next to move from, once the window is large.
    memo: Option<Box<Memo>>,
}

/// What a window remembers of its last query, so that the next one moves from there instead of
/// starting over. A window is read either by summaries or by `count_distinct`, never both (see
/// [`crate::layout`]), so it keeps one or the other.
// Always boxed, one per large window: a `Distinct` spends the `Edge`'s size beside a map of
// the values of its more than SPLIT_ABOVE events.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
enum Memo {
    /// Summaries in time order, once the window holds more than [`EDGE_ABOVE`] events.
    Edge(Edge),
    /// `count_distinct`, once the window holds more than [`SPLIT_ABOVE`] events: the values of
    /// the last window asked about.
    Distinct(Distinct),
}

impl KeyWindow {
    /// Starts loading what the next insert and in-order query of this window read (its newest
    /// event, its edge and index, and unless it is indexed its oldest event) into the CPU's
    /// caches.
    pub fn prefetch(&self) {
        if let Some(newest) = self.entries.back() {
            prefetch(newest);
        }
        if self.index.is_none() {
            // Eviction, and the scan of a small window from its left edge, start at the
            // oldest event (an indexed window evicts whole panes, a few times per window).
            if let Some(oldest) = self.entries.front() {
                prefetch(oldest);
            }
            // The search for what to evict reads the first few, which may cross a line.
            if let Some(third) = self.entries.get(2) {
                prefetch(third);
            }
        }
        if let Some(memo) = &self.memo {
            prefetch_all::<Memo>(memo);
        }
        if let Some(index) = &self.index {
            prefetch::<PaneIndex>(&**index);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds an event; events may arrive in any time order.
    pub fn insert(&mut self, shape: Shape, e: Entry) {
        let in_order = self.entries.is_empty() || e.ts >= self.newest;
        if in_order {
            if self.entries.is_empty() {
                self.evictable_at = e.ts;
            }
            self.newest = e.ts;
            self.entries.push_back(e);
        } else {
            // It lands among the entries the index holds, not after them.
            if let Some(index) = &mut self.index {
                index.catch_up(&self.entries);
            }
            let at = boundary(&self.entries, true, |x| x.ts <= e.ts);
            self.entries.insert(at, e);
            self.evictable_at = self.evictable_at.min(e.ts);
        }
        match self.memo.as_deref_mut() {
            Some(Memo::Distinct(d)) if e.ts > d.lo && e.ts <= d.hi && !is_no_value(e.value) => {
                d.add(e.value)
            }
            Some(Memo::Distinct(_)) => {}
            Some(Memo::Edge(edge)) if e.ts >= edge.chunk_last => {
                edge.rest.add(e.value, edge.moments)
            }
            // Inside the chunk: its indexes moved.
            Some(Memo::Edge(_)) => self.memo = None,
            None => {}
        }
        match &mut self.index {
            Some(index) if in_order => index.unindexed += 1,
            Some(index) => index.add(e, &self.entries, self.entries.len()),
            None if self.entries.len() > SPLIT_ABOVE => {
                self.index = Some(Box::new(PaneIndex::build(shape, &self.entries)));
            }
            None => {}
        }
    }

    /// Makes the index fit `shape` (a reload may start asking for the second moment).
    pub fn prepare(&mut self, shape: Shape) {
        if let Some(index) = &mut self.index {
            if index.shape != shape {
                **index = PaneIndex::build(shape, &self.entries);
            }
        }
        if let Some(Memo::Edge(edge)) = self.memo.as_deref() {
            if edge.moments != shape.moments {
                self.memo = None;
            }
        }
    }

    /// Summary of the events with `t − window < ts <= t`.
    pub fn summary(&mut self, shape: Shape, t: i64) -> Summary {
        let lo = t - shape.window_ms;
        if t >= self.newest && self.entries.len() > EDGE_ABOVE {
            return self.summary_in_order(shape, lo);
        }
        let mut out = Summary::default();
        match &mut self.index {
            Some(index) => index.query(lo, t, self.newest, &self.entries, &mut out),
            None => scan(&self.entries, lo, t, shape.moments, &mut out),
        }
        out
    }

    /// Summary of the events with `ts > lo`, all of them at or before the query's time: moves
    /// the edge from where the last such query left it, or builds a new one.
    fn summary_in_order(&mut self, shape: Shape, lo: i64) -> Summary {
        let entries = &self.entries;
        if let Some(Memo::Edge(edge)) = self.memo.as_deref_mut() {
            if edge.advance(lo).is_some() {
                return edge.summary(shape.moments);
            }
        }
        let edge = Edge::build(shape, lo, entries, self.index.as_deref_mut(), self.newest);
        let out = edge.summary(shape.moments);
        match self.memo.as_deref_mut() {
            Some(Memo::Edge(old)) => *old = edge,
            _ => self.memo = Some(Box::new(Memo::Edge(edge))),
        }
        out
    }

    /// The latest entry with `t − window < ts <= t` (ties: the one processed last).
    pub fn last(&self, window_ms: i64, t: i64) -> Option<Entry> {
        let to = boundary(&self.entries, true, |e| e.ts <= t);
        let e = *self.entries.get(to.checked_sub(1)?)?;
        (e.ts > t - window_ms).then_some(e)
    }

    /// Number of distinct values among the events with `t − window < ts <= t`. A small window
    /// is scanned (`scratch` is a reusable buffer); a large one moves its multiset of values.
    pub fn count_distinct(&mut self, window_ms: i64, t: i64, scratch: &mut Vec<u64>) -> u64 {
        let lo = t - window_ms;
        let remembered = matches!(self.memo.as_deref(), Some(Memo::Distinct(_)));
        if self.entries.len() > SPLIT_ABOVE || remembered {
            if !remembered {
                self.memo = Some(Box::new(Memo::Distinct(Distinct {
                    lo: i64::MIN,
                    hi: i64::MIN,
                    counts: HashMap::new(),
                })));
            }
            if let Some(Memo::Distinct(d)) = self.memo.as_deref_mut() {
                d.move_to(&self.entries, lo, t);
                return d.counts.len() as u64;
            }
        }
        let from = count_through(&self.entries, lo);
        scratch.clear();
        scratch.extend(
            self.entries
                .range(from..)
                .take_while(|e| e.ts <= t)
                .filter(|e| !is_no_value(e.value))
                .map(|e| e.value.to_bits()),
        );
        scratch.sort_unstable();
        scratch.dedup();
        scratch.len() as u64
    }

    /// Whether [`Self::evict`] at `horizon` may drop anything (when `false`, it surely
    /// drops nothing).
    pub fn can_evict(&self, horizon: i64) -> bool {
        !self.entries.is_empty() && horizon >= self.evictable_at
    }

    /// Drops the events no query can reach any more: those at or before `horizon`, by whole
    /// panes once the window is indexed. Returns the number dropped.
    pub fn evict(&mut self, horizon: i64) -> usize {
        if !self.can_evict(horizon) {
            return 0;
        }
        let dropped = match &mut self.index {
            Some(index) => index.evict(horizon, &self.entries),
            None => boundary(&self.entries, false, |e| e.ts <= horizon),
        }
        .min(self.entries.len());
        if let Some(newest_dropped) = dropped.checked_sub(1) {
            match self.memo.as_deref_mut() {
                // The multiset must not count events that are gone.
                Some(Memo::Distinct(d)) if self.entries[newest_dropped].ts > d.lo => {
                    self.memo = None
                }
                Some(Memo::Edge(edge)) if dropped <= edge.chunk_end => edge.chunk_end -= dropped,
                // `rest` counts events that are gone.
                Some(Memo::Edge(_)) => self.memo = None,
                _ => {}
            }
        }
        self.entries.drain(..dropped);
        // Small again: scanning is cheaper than keeping the indexes.
        if self.entries.len() <= SPLIT_ABOVE / 2 {
            self.index = None;
            if matches!(self.memo.as_deref(), Some(Memo::Distinct(_))) {
                self.memo = None;
            }
        }
        if self.entries.len() <= EDGE_ABOVE / 2 {
            self.memo = None;
        }
        self.evictable_at = match (&self.index, self.entries.front()) {
            (Some(index), _) => index.panes.front().map_or(i64::MAX, |p| p.max_ts),
            (None, Some(e)) => e.ts,
            (None, None) => i64::MAX,
        };
        // Keep small buffers for the key's next events; give large ones back.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
            if let Some(index) = &mut self.index {
                index.panes.shrink_to(index.panes.len() * 2);
                index.suffix.shrink_to(index.suffix.len() * 2);
            }
        }
        dropped
    }

    /// Approximate heap bytes held (for the cache's memory cap).
    pub fn approx_bytes(&self) -> usize {
        allocated(self.entries.capacity() * std::mem::size_of::<Entry>())
            + self.index.as_ref().map_or(0, |i| i.approx_bytes())
            + match self.memo.as_deref() {
                Some(Memo::Distinct(d)) => std::mem::size_of::<Memo>() + d.counts.capacity() * 16,
                Some(Memo::Edge(_)) => std::mem::size_of::<Memo>(),
                None => 0,
            }
    }

    /// Appends the encoding of this window to `out`: the number of events, then each event as
    /// its time's difference from the previous one (zigzag varint) and its value (8 bytes LE).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(5 + self.entries.len() * 11);
        put_varint(out, self.entries.len() as u64);
        let mut prev = 0i64;
        for e in &self.entries {
            put_varint(out, zigzag(e.ts.wrapping_sub(prev)));
            out.extend_from_slice(&e.value.to_le_bytes());
            prev = e.ts;
        }
    }

    /// Decodes a window written by [`Self::encode`] from the front of `bytes`, advancing it;
    /// `None` if the bytes are not one (truncated, or events out of time order).
    pub fn decode_from(bytes: &mut &[u8]) -> Option<KeyWindow> {
        let n = usize::try_from(get_varint(bytes)?).ok()?;
        // Each event takes at least 9 bytes: refuse counts the input cannot hold.
        if n > bytes.len() / 9 {
            return None;
        }
        let mut entries = VecDeque::with_capacity(n);
        let mut prev = 0i64;
        for _ in 0..n {
            let ts = prev.wrapping_add(unzigzag(get_varint(bytes)?));
            let (value, rest) = bytes.split_first_chunk::<8>()?;
            *bytes = rest;
            if !entries.is_empty() && ts < prev {
                return None;
            }
            entries.push_back(Entry {
                ts,
                value: f64::from_le_bytes(*value),
            });
            prev = ts;
        }
        Some(KeyWindow {
            evictable_at: entries.front().map_or(0, |e| e.ts),
            newest: entries.back().map_or(0, |e| e.ts),
            entries,
            ..KeyWindow::default()
        })
    }

    /// Decodes exactly one window.
    pub fn decode(mut bytes: &[u8]) -> Option<KeyWindow> {
        let w = Self::decode_from(&mut bytes)?;
        bytes.is_empty().then_some(w)
    }
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn get_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, the slow way: `(events, values, sum, min, max, sample stddev)` of the
    /// events in `(t − window, t]` and their values, with a two-pass variance.
    #[allow(clippy::type_complexity)]
    fn naive(
        events: &[Entry],
        window: i64,
        t: i64,
    ) -> (u64, u64, f64, Option<f64>, Option<f64>, Option<f64>) {
        let inside: Vec<f64> = events
            .iter()
            .filter(|e| e.ts > t - window && e.ts <= t)
            .map(|e| e.value)
            .collect();
        let values: Vec<f64> = inside
            .iter()
            .copied()
            .filter(|v| !is_no_value(*v))
            .collect();
        let n = values.len();
        let sum: f64 = values.iter().sum();
        let min = values.iter().copied().reduce(f64::min);
        let max = values.iter().copied().reduce(f64::max);
        let stddev = (n > 1).then(|| {
            let mean = sum / n as f64;
            let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
            (ss / (n - 1) as f64).sqrt()
        });
        (inside.len() as u64, n as u64, sum, min, max, stddev)
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

    /// Streams `n` events through a window, checking every aggregate at every event against
    /// the definition. `gap` bounds the time between events; about one in `disorder` events
    /// arrives late by up to `late` ms.
    fn check_stream(seed: u64, window: i64, n: u64, gap: u64, disorder: u64, late: u64) {
        check_stream_filtered(seed, window, n, gap, disorder, late, None)
    }

    /// [`check_stream`], where about one in `filtered` events (if given) is asked about but
    /// not held, as for an event a `where` filter leaves out, stamped up to `late` ms ahead or
    /// behind: a query ahead of every event held is followed by one behind it, and a query out
    /// of order follows events in order.
    fn check_stream_filtered(
        seed: u64,
        window: i64,
        n: u64,
        gap: u64,
        disorder: u64,
        late: u64,
        filtered: Option<u64>,
    ) {
        let mut rng = Lcg(seed);
        let shape = Shape::new(window, true);
        let mut w = KeyWindow::default();
        let mut seen = Vec::new();
        let mut now = 1_000_000i64;
        for i in 0..n {
            now += rng.next(gap + 1) as i64;
            let held = filtered.is_none_or(|f| rng.next(f) != 0);
            let ts = if !held {
                now + rng.next(2 * late + 1) as i64 - late as i64
            } else if rng.next(disorder) == 0 {
                now - rng.next(late + 1) as i64
            } else {
                now
            };
            // Few distinct values, so count_distinct is interesting; some events have none.
            let value = match rng.next(10) {
                0 => NO_VALUE,
                _ => (rng.next(5_000) as f64) / 100.0,
            };
            let e = Entry { ts, value };
            if held {
                w.insert(shape, e);
                seen.push(e);
            }
            if i % 97 == 0 {
                // No later query is older than `now − late`: what lies at or before
                // `now − late − window` may go, and the answers must not change.
                w.evict(now - late as i64 - window);
            }
            let got = w.summary(shape, ts);
            let (events, count, sum, min, max, stddev) = naive(&seen, window, ts);
            assert_eq!(got.events, events, "seed {seed} event {i}");
            assert_eq!(got.count, count, "seed {seed} event {i}");
            assert!(
                close(got.sum(), (count > 0).then_some(sum)),
                "seed {seed} event {i}"
            );
            assert!(close(got.avg(), (count > 0).then(|| sum / count as f64)));
            assert!(close(got.stddev(), stddev), "{:?} {stddev:?}", got.stddev());
            assert_eq!(got.min(), min);
            assert_eq!(got.max(), max);
            // The latest event in the window; among equal times the one that arrived last
            // (`max_by_key` returns the last maximum).
            let last = seen
                .iter()
                .filter(|x| x.ts > ts - window && x.ts <= ts)
                .max_by_key(|x| x.ts)
                .copied();
            let bits = |e: Option<Entry>| e.map(|e| (e.ts, e.value.to_bits()));
            assert_eq!(bits(w.last(window, ts)), bits(last));
            let mut distinct: Vec<u64> = seen
                .iter()
                .filter(|x| x.ts > ts - window && x.ts <= ts && !is_no_value(x.value))
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

    #[test]
    fn sparse_keys_match_the_definition() {
        // A few events per window: no index, plain scans.
        check_stream(1, 10_000, 2000, 5_000, 10, 5_000);
        check_stream(2, 3_600_000, 2000, 600_000, 10, 1_800_000);
    }

    #[test]
    fn dense_keys_match_the_definition() {
        // Hundreds to thousands of events per window and per pane: panes split into
        // sub-panes, several levels deep, with out-of-order arrivals.
        check_stream(3, 60_000, 4000, 40, 10, 30_000);
        check_stream(4, 1_000, 3000, 2, 8, 500);
        check_stream(5, 17, 3000, 1, 5, 10);
        check_stream(6, 3_600_000, 3000, 100, 4, 3_000_000);
    }

    #[test]
    fn an_edge_follows_eviction_and_out_of_order_inserts() {
        // Events every 10 ms, a 1 s window: 100 events in it, an edge after the first query.
        let shape = Shape::new(1_000, false);
        let mut w = KeyWindow::default();
        let one = |ts| Entry { ts, value: 1.0 };
        let has_edge = |w: &KeyWindow| matches!(w.memo.as_deref(), Some(Memo::Edge(_)));
        for ts in (0..2_000).step_by(10) {
            w.insert(shape, one(ts));
        }
        assert_eq!(w.summary(shape, 1_990).count, 100);
        assert!(has_edge(&w));
        // Eviction of what lies before the edge (no later query reaches back past 900).
        assert!(w.evict(900) > 0);
        assert!(has_edge(&w));
        for ts in (2_000..2_500).step_by(10) {
            w.insert(shape, one(ts));
            assert_eq!(w.summary(shape, ts).count, 100, "at {ts}");
        }
        // The last query's edge lay at 1,490. Events arrive without queries, then eviction
        // drops the first events of the edge's chunk: the edge shifts and stays.
        for ts in (2_500..2_700).step_by(10) {
            w.insert(shape, one(ts));
        }
        assert!(w.evict(1_600) > 0);
        assert!(has_edge(&w));
        assert_eq!(w.summary(shape, 2_690).count, 100);
        // The chunk now holds 1,700 to 1,850. Eviction drops whole panes of 62 ms: up to the
        // one ending at 1,860, the edge stays; the next pane (1,860 to 1,920) lies past the
        // chunk, and the edge's summary of the rest no longer holds.
        for ts in (2_700..3_300).step_by(10) {
            w.insert(shape, one(ts));
        }
        assert!(w.evict(1_919) > 0);
        assert!(has_edge(&w));
        assert!(w.evict(1_920) > 0);
        assert!(!has_edge(&w));
        assert_eq!(w.summary(shape, 3_290).count, 100);
        // An event out of order after the rest has begun joins it; one inside the chunk
        // (which starts at 2,300) moves its events, and the edge is rebuilt.
        w.insert(shape, one(2_700));
        assert!(has_edge(&w));
        assert_eq!(w.summary(shape, 3_290).count, 101);
        w.insert(shape, one(2_305));
        assert!(!has_edge(&w));
        assert_eq!(w.summary(shape, 3_290).count, 102);
        // A query out of order (an event left out of the window) after events in order.
        for ts in (3_300..3_400).step_by(10) {
            w.insert(shape, one(ts));
            // 100 every 10 ms, and the two that came late while inside the window.
            let late = [2_305, 2_700].iter().filter(|&&l| l > ts - 1_000).count() as u64;
            assert_eq!(w.summary(shape, ts).count, 100 + late, "at {ts}");
        }
        // (2,355, 3,355]: 2,360 to 3,350, and the event at 2,700 that came late.
        assert_eq!(w.summary(shape, 3_355).count, 101);
        assert!(has_edge(&w));
        assert_eq!(w.summary(shape, 3_390).count, 101);
    }

    #[test]
    fn a_query_reaching_back_past_the_edge_moves_it_back() {
        // Events every 10 ms, a 1 s window. A query ahead of every event (one a `where` filter
        // leaves out) moves the edge to 1,500; the next, at the newest event, reaches back to
        // 1,000, before the edge's chunk: the events in between count again.
        let shape = Shape::new(1_000, false);
        let mut w = KeyWindow::default();
        for ts in (0..2_000).step_by(10) {
            w.insert(shape, Entry { ts, value: 1.0 });
        }
        assert_eq!(w.summary(shape, 1_990).count, 100);
        assert_eq!(w.summary(shape, 2_500).count, 49);
        assert_eq!(w.summary(shape, 2_495).count, 50);
        w.insert(
            shape,
            Entry {
                ts: 2_000,
                value: 1.0,
            },
        );
        assert_eq!(w.summary(shape, 2_000).count, 100);
        assert_eq!(w.summary(shape, 2_000).count, 100);
    }

    #[test]
    fn a_window_starts_keeping_the_second_moment_when_asked() {
        // A reload adds a `stddev` to a window that had only counts and sums: its index and
        // edge were built without the second moment and must be rebuilt with it.
        let (plain, moments) = (Shape::new(1_000, false), Shape::new(1_000, true));
        let mut w = KeyWindow::default();
        let mut seen = Vec::new();
        for i in 0..300i64 {
            let e = Entry {
                ts: i * 10,
                value: (i % 7) as f64,
            };
            w.insert(plain, e);
            seen.push(e);
            assert_eq!(w.summary(plain, e.ts).count, (i + 1).min(100) as u64);
        }
        let mut out_of_order = w.clone();
        w.prepare(moments);
        let (.., stddev) = naive(&seen, 1_000, 2_990);
        assert!(stddev.is_some());
        assert!(
            close(w.summary(moments, 2_990).stddev(), stddev),
            "in order"
        );
        out_of_order.prepare(moments);
        let (.., stddev) = naive(&seen, 1_000, 2_500);
        assert!(
            close(out_of_order.summary(moments, 2_500).stddev(), stddev),
            "out of order"
        );
    }

    #[test]
    fn queries_ahead_of_the_events_held_match_the_definition() {
        // In-order queries whose left edge moves back (the query before lay ahead of every
        // event held), over small windows, edges and indexed ones.
        check_stream_filtered(9, 10_000, 3000, 200, 10, 5_000, Some(3));
        check_stream_filtered(10, 60_000, 4000, 40, 50, 30_000, Some(2));
        check_stream_filtered(11, 3_600_000, 3000, 100, 1000, 3_000, Some(4));
    }

    #[test]
    fn equal_times_and_bursts_match_the_definition() {
        // Many events in the same millisecond (a bucket that cannot be split).
        check_stream(7, 50, 2000, 0, 3, 20);
        check_stream(8, 5_000, 3000, 1, 20, 0);
    }

    #[test]
    fn a_query_never_scans_more_than_the_edges() {
        // One very hot key: 100,000 events in an hour, in order. The index must answer every
        // query by summaries plus at most SPLIT_ABOVE events at each edge.
        let shape = Shape::new(3_600_000, false);
        let mut w = KeyWindow::default();
        for i in 0..100_000i64 {
            w.insert(
                shape,
                Entry {
                    ts: i * 36,
                    value: 1.0,
                },
            );
        }
        // The first query brings the index up to date with the events inserted in order.
        assert_eq!(w.summary(shape, 99_999 * 36).count, 100_000);
        let panes = &w
            .index
            .as_ref()
            .expect("a hot key's window is indexed")
            .panes;
        let deepest = |b: &Bucket| -> usize {
            fn depth(b: &Bucket) -> usize {
                1 + b.children.iter().map(depth).max().unwrap_or(0)
            }
            depth(b)
        };
        assert!(panes.iter().map(deepest).max().unwrap_or(0) >= 2);
        // Every leaf holds at most SPLIT_ABOVE events, so an edge scans at most that many.
        fn leaves_small(b: &Bucket) -> bool {
            if b.children.is_empty() {
                b.summary.events as usize <= SPLIT_ABOVE || b.min_ts == b.max_ts
            } else {
                b.children.iter().all(leaves_small)
            }
        }
        assert!(panes.iter().all(leaves_small));
        assert_eq!(w.summary(shape, 99_999 * 36).count, 100_000);
        assert_eq!(w.summary(shape, 50_000 * 36).count, 50_001);
        // i * 36 in (900_000, 4_500_000]: i from 25_001 to 99_999.
        assert_eq!(w.summary(shape, 4_500_000).count, 74_999);
    }

    #[test]
    fn an_index_catches_up_with_events_inserted_without_queries() {
        // Runs of events in order with no query between them (the index only counts them),
        // dense enough that panes split while catching up, then queries in and out of order,
        // then an event out of order and an eviction, each arriving with events still to add.
        let shape = Shape::new(60_000, true);
        let mut rng = Lcg(12);
        let mut w = KeyWindow::default();
        let mut seen = Vec::new();
        let mut now = 0i64;
        for round in 0..40 {
            for _ in 0..rng.next(400) {
                now += rng.next(30) as i64;
                let e = Entry {
                    ts: now,
                    value: rng.next(1_000) as f64,
                };
                w.insert(shape, e);
                seen.push(e);
            }
            let ts = match round % 4 {
                0 => now,
                1 => now - rng.next(60_000) as i64,
                2 => {
                    let e = Entry {
                        ts: now - rng.next(20_000) as i64,
                        value: 1.0,
                    };
                    w.insert(shape, e);
                    seen.push(e);
                    now
                }
                _ => {
                    // No query reaches back further than two windows from `now`.
                    let horizon = now - 120_000;
                    w.evict(horizon);
                    seen.retain(|e| e.ts > horizon);
                    now
                }
            };
            let got = w.summary(shape, ts);
            let (events, count, sum, min, max, stddev) = naive(&seen, 60_000, ts);
            assert_eq!((got.events, got.count), (events, count), "round {round}");
            assert!(
                close(got.sum(), (count > 0).then_some(sum)),
                "round {round}"
            );
            assert_eq!((got.min(), got.max()), (min, max), "round {round}");
            assert!(close(got.stddev(), stddev), "round {round}");
        }
    }

    #[test]
    fn a_sparse_window_is_small() {
        // Most keys hold a few events: their windows must not carry the index's weight.
        assert!(std::mem::size_of::<KeyWindow>() <= 64);
    }

    #[test]
    fn boundaries_are_found_from_either_end() {
        for n in 0..70usize {
            let items: VecDeque<usize> = (0..n).collect();
            for cut in 0..=n {
                for from_back in [false, true] {
                    assert_eq!(
                        boundary(&items, from_back, |&x| x < cut),
                        cut,
                        "n {n} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn window_edges_are_exact_to_the_millisecond() {
        for moments in [false, true] {
            let shape = Shape::new(1000, moments);
            let mut w = KeyWindow::default();
            for ts in [0i64, 1, 999, 1000, 1001] {
                w.insert(shape, Entry { ts, value: 1.0 });
            }
            // (1000 − 1000, 1000] excludes ts 0, includes ts 1 and 1000.
            assert_eq!(w.summary(shape, 1000).count, 3);
            assert_eq!(w.summary(shape, 1001).count, 3);
            assert_eq!(w.summary(shape, 999).count, 3);
            assert_eq!(w.summary(shape, 0).count, 1);
            assert_eq!(w.summary(shape, -1).count, 0);
        }
    }

    #[test]
    fn windows_survive_encoding() {
        let shape = Shape::new(60_000, false);
        let mut w = KeyWindow::default();
        for i in 0..100i64 {
            w.insert(
                shape,
                Entry {
                    ts: 1_735_689_600_000 + i * 997 - (i % 7) * 3000,
                    value: i as f64 * 1.5,
                },
            );
        }
        let mut bytes = Vec::new();
        w.encode(&mut bytes);
        let mut back = KeyWindow::decode(&bytes).expect("decodes");
        assert_eq!(back.entries, w.entries);
        // The rebuilt window answers like the original.
        for t in (0..100).map(|i| 1_735_689_600_000 + i * 1000) {
            assert_eq!(back.summary(shape, t), w.summary(shape, t));
        }
        assert_eq!(
            KeyWindow::decode(&bytes[..bytes.len() - 1]),
            None,
            "truncated"
        );
        bytes.push(0);
        assert_eq!(KeyWindow::decode(&bytes), None, "trailing bytes");
        assert_eq!(KeyWindow::decode(&[9]), None, "not a window");
        assert_eq!(KeyWindow::decode(&[0xff; 12]), None, "not a window");
        // Events out of time order are refused.
        let mut bad = Vec::new();
        put_varint(&mut bad, 2);
        put_varint(&mut bad, zigzag(100));
        bad.extend_from_slice(&1.0f64.to_le_bytes());
        put_varint(&mut bad, zigzag(-1));
        bad.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(KeyWindow::decode(&bad), None, "unsorted");
    }

    #[test]
    fn eviction_drops_only_what_no_query_can_reach() {
        let shape = Shape::new(1600, false);
        let mut w = KeyWindow::default();
        for i in 0..1000 {
            w.insert(
                shape,
                Entry {
                    ts: i * 10,
                    value: 1.0,
                },
            );
        }
        assert_eq!(w.len(), 1000);
        let dropped = w.evict(5000);
        // Whole panes of 100 ms: those ending at or before 5000.
        assert_eq!(dropped, 500);
        assert_eq!(w.summary(shape, 9990).count, 160);
        assert_eq!(w.evict(5000), 0);
        // Everything behind: the window empties and drops its index.
        assert_eq!(w.evict(20_000), 500);
        assert!(w.is_empty());
        assert_eq!(
            w.approx_bytes() / std::mem::size_of::<Entry>(),
            w.entries.capacity()
        );
        // A sparse window evicts event by event.
        let mut w = KeyWindow::default();
        for ts in [10, 20, 30] {
            w.insert(shape, Entry { ts, value: 1.0 });
        }
        assert_eq!(w.evict(20), 2);
        assert_eq!(w.len(), 1);
    }
}
