//! How a bundle's windowed features map onto state.
//!
//! Features over the same key fields form an *entity*: one record per key. Within an entity,
//! features over the same `where` filter read one *log* ([`crate::log`]): the key's events that
//! passed the filter, kept once, with every field those features aggregate. Windows of every
//! length over a log share its events and one walk over them per query.
//!
//! Within a log, features that aggregate the same events share one *window*: `count`, `sum`,
//! `avg`, `min`, `max` and `stddev` over the same length and `of` field read one summary, so
//! `cust_avg_amount_1d` and `cust_max_amount_1d` are one window. `count_distinct`, `last` and
//! `seconds_since_last` are windows of their own. A window is what a large log keeps a view
//! for, and what a feature's warm-up is tracked by.
//!
//! Identities are stable hashes of what a thing holds, never of which other features exist: a
//! log's of its entity and filter, a field's of its name, a window's of its entity, length,
//! filter, field and (for windows of their own) aggregation. A feature whose definition a
//! reload leaves unchanged keeps its state; a feature a reload adds over a log that exists
//! starts with the events it holds (of a field new to the log: with none of their values).
//!
//! This module only plans; the operator reads batches and state.

use riskstream_rules::{Agg, CompiledWindowFeature};

use crate::log::ViewSpec;
use crate::window::Shape;

/// The entities of a bundle's windowed features.
#[derive(Debug)]
pub(crate) struct Layout<'a> {
    pub entities: Vec<Entity<'a>>,
}

/// Features keyed by the same fields: one record per key.
#[derive(Debug)]
pub(crate) struct Entity<'a> {
    /// Prefixes the state keys of the entity's records.
    pub id: [u8; 8],
    /// Column indexes of the key fields.
    pub columns: &'a [usize],
    pub logs: Vec<Log<'a>>,
}

/// The events of an entity that pass one filter, and the windows over them.
#[derive(Debug)]
pub(crate) struct Log<'a> {
    pub id: [u8; 8],
    /// The feature whose `where` decides which events the log holds.
    pub source: &'a CompiledWindowFeature,
    pub fields: Vec<Field<'a>>,
    /// The fields' ids, in order (what a key's log must hold).
    pub field_ids: Vec<[u8; 8]>,
    pub windows: Vec<Window>,
    /// The windows as views of a large log.
    pub views: Vec<ViewSpec>,
    /// The distinct lengths of the summarized windows, ascending.
    pub lengths: Vec<i64>,
    /// Fields some summarized window aggregates.
    pub summed: Vec<usize>,
    /// Some summarized window keeps the second moment (a `stddev`).
    pub moments: bool,
    /// Per field that `count_distinct` windows read: the field and their lengths, ascending.
    pub distinct: Vec<(usize, Vec<i64>)>,
    /// The longest window: events older than that are out of every window's reach.
    pub reach_ms: i64,
}

/// A field a log keeps a value of per event.
#[derive(Debug)]
pub(crate) struct Field<'a> {
    pub id: [u8; 8],
    /// The feature that first aggregates it (its column and name, for errors).
    pub source: &'a CompiledWindowFeature,
    /// Only `count_distinct` reads it (a field of any type is hashed then).
    pub distinct_only: bool,
}

/// One window per key of a log, read by one or more features.
#[derive(Debug)]
pub(crate) struct Window {
    pub id: [u8; 8],
    pub shape: Shape,
    /// The field it aggregates (an index into the log's fields); `None`: the events.
    pub field: Option<usize>,
    pub readers: Vec<Reader>,
    /// Some reader uses the window's summary (all but `count_distinct`, `last`,
    /// `seconds_since_last`).
    pub summarized: bool,
    /// For a summarized window, its length's index in the log's `lengths`, and its field's
    /// index in the log's `summed`; for a `count_distinct` window, its index among the
    /// distinct counts of a walk over all of the log's `distinct` groups.
    pub length: usize,
    pub slot: usize,
}

/// A feature read from a window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader {
    /// Index of the feature in the bundle's windowed features (and of its output column).
    pub feature: usize,
    pub agg: Agg,
    /// A `count` without a field: counts events (the window holds no values).
    pub counts_events: bool,
    /// Its place among its entity's readers, in the order of the entity's logs, their
    /// windows and theirs (where the operator writes its values).
    pub column: usize,
}

/// Aggregations answered by a window's summary.
fn summarized(agg: Agg) -> bool {
    matches!(
        agg,
        Agg::Count | Agg::Sum | Agg::Avg | Agg::Min | Agg::Max | Agg::Stddev
    )
}

/// FNV-1a: stable across builds, platforms and Rust versions (unlike the std hasher), which
/// matters for anything persisted in the state store.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn stable_id(text: &str) -> [u8; 8] {
    fnv1a(text.as_bytes()).to_be_bytes()
}

impl<'a> Layout<'a> {
    pub fn new(features: &'a [CompiledWindowFeature]) -> Self {
        let mut layout = Layout {
            entities: Vec::new(),
        };
        for (index, feature) in features.iter().enumerate() {
            layout.place(index, feature);
        }
        for log in layout.entities.iter_mut().flat_map(|e| e.logs.iter_mut()) {
            log.finish();
        }
        for entity in &mut layout.entities {
            let readers = entity
                .logs
                .iter_mut()
                .flat_map(|l| &mut l.windows)
                .flat_map(|w| &mut w.readers);
            for (column, reader) in readers.enumerate() {
                reader.column = column;
            }
        }
        layout
    }

    fn place(&mut self, index: usize, feature: &'a CompiledWindowFeature) {
        let spec = &feature.spec;
        let entity_name = spec.entity.join("\u{1f}");
        let at = match self
            .entities
            .iter()
            .position(|e| e.columns == feature.entity_columns.as_slice())
        {
            Some(at) => at,
            None => {
                self.entities.push(Entity {
                    id: stable_id(&format!("entity|{entity_name}")),
                    columns: &feature.entity_columns,
                    logs: Vec::new(),
                });
                self.entities.len() - 1
            }
        };
        let entity = &mut self.entities[at];
        let at = match entity
            .logs
            .iter()
            .position(|l| l.source.spec.filter == spec.filter)
        {
            Some(at) => at,
            None => {
                entity.logs.push(Log {
                    id: stable_id(&format!("log|{entity_name}|{:?}", spec.filter)),
                    source: feature,
                    fields: Vec::new(),
                    field_ids: Vec::new(),
                    windows: Vec::new(),
                    views: Vec::new(),
                    lengths: Vec::new(),
                    summed: Vec::new(),
                    moments: false,
                    distinct: Vec::new(),
                    reach_ms: 0,
                });
                entity.logs.len() - 1
            }
        };
        let log = &mut entity.logs[at];
        let field = spec.of.as_ref().map(|name| {
            let distinct = spec.agg == Agg::CountDistinct;
            match log
                .fields
                .iter()
                .position(|f| f.source.spec.of.as_ref() == Some(name))
            {
                Some(at) => {
                    log.fields[at].distinct_only &= distinct;
                    at
                }
                None => {
                    log.fields.push(Field {
                        id: stable_id(&format!("field|{name}")),
                        source: feature,
                        distinct_only: distinct,
                    });
                    log.fields.len() - 1
                }
            }
        });
        let reader = Reader {
            feature: index,
            agg: spec.agg,
            counts_events: spec.agg == Agg::Count && spec.of.is_none(),
            column: 0,
        };
        let window_ms = feature.window_ms();
        let shared = if summarized(spec.agg) {
            log.windows
                .iter_mut()
                .find(|w| w.summarized && w.shape.window_ms == window_ms && w.field == field)
        } else {
            None
        };
        match shared {
            Some(window) => {
                window.readers.push(reader);
                window.shape.moments |= spec.agg == Agg::Stddev;
            }
            None => {
                let kind = if summarized(spec.agg) {
                    "summary".to_string()
                } else {
                    format!("{:?}", spec.agg)
                };
                let id = stable_id(&format!(
                    "window|{entity_name}|{window_ms}|{:?}|{:?}|{kind}",
                    spec.filter, spec.of
                ));
                log.windows.push(Window {
                    id,
                    shape: Shape::new(window_ms, spec.agg == Agg::Stddev),
                    field,
                    readers: vec![reader],
                    summarized: summarized(spec.agg),
                    length: 0,
                    slot: 0,
                });
            }
        }
    }

    /// Every window, with the log it belongs to.
    pub fn windows(&self) -> impl Iterator<Item = &Window> {
        self.logs().flat_map(|l| l.windows.iter())
    }

    /// Every log.
    pub fn logs(&self) -> impl Iterator<Item = &Log<'a>> {
        self.entities.iter().flat_map(|e| e.logs.iter())
    }
}

impl Window {
    /// What the window answers: `Agg::Count` for a summarized window (every reader reads its
    /// summary), else the aggregation of its readers (`count_distinct`, `last`,
    /// `seconds_since_last`: windows of their own).
    pub fn kind(&self) -> Agg {
        if self.summarized {
            return Agg::Count;
        }
        self.readers.first().map_or(Agg::Count, |r| r.agg)
    }

    fn is_distinct(&self) -> bool {
        self.kind() == Agg::CountDistinct
    }
}

impl Log<'_> {
    /// Derives what queries need from the windows placed.
    fn finish(&mut self) {
        self.field_ids = self.fields.iter().map(|f| f.id).collect();
        let mut lengths: Vec<i64> = self
            .windows
            .iter()
            .filter(|w| w.summarized)
            .map(|w| w.shape.window_ms)
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        for w in self.windows.iter_mut().filter(|w| w.summarized) {
            w.length = lengths.partition_point(|&l| l < w.shape.window_ms);
        }
        self.lengths = lengths;
        let mut summed: Vec<usize> = self
            .windows
            .iter()
            .filter(|w| w.summarized)
            .filter_map(|w| w.field)
            .collect();
        summed.sort_unstable();
        summed.dedup();
        for w in self.windows.iter_mut() {
            w.slot = w
                .field
                .and_then(|f| summed.iter().position(|&s| s == f))
                .unwrap_or(0);
        }
        self.summed = summed;
        self.moments = self.windows.iter().any(|w| w.summarized && w.shape.moments);
        let mut distinct: Vec<(usize, Vec<i64>)> = Vec::new();
        for w in self.windows.iter().filter(|w| w.is_distinct()) {
            let Some(field) = w.field else { continue };
            match distinct.iter_mut().find(|(f, _)| *f == field) {
                Some((_, lengths)) => lengths.push(w.shape.window_ms),
                None => distinct.push((field, vec![w.shape.window_ms])),
            }
        }
        for (_, lengths) in distinct.iter_mut() {
            lengths.sort_unstable();
            lengths.dedup();
        }
        for w in self.windows.iter_mut().filter(|w| w.is_distinct()) {
            let mut offset = 0;
            for (field, lengths) in &distinct {
                if w.field == Some(*field) {
                    w.slot = offset + lengths.partition_point(|&l| l < w.shape.window_ms);
                }
                offset += lengths.len();
            }
        }
        self.distinct = distinct;
        self.reach_ms = self
            .windows
            .iter()
            .map(|w| w.shape.window_ms)
            .max()
            .unwrap_or(0);
        self.views = self
            .windows
            .iter()
            .map(|w| ViewSpec {
                id: w.id,
                shape: w.shape,
                field: w.field,
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use riskstream_common::Config;
    use riskstream_rules::RuleCompiler;

    #[test]
    fn features_over_the_same_events_share_a_log_and_a_window(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let schema = Config::defaults()?.event_schema()?;
        let features = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/synccfd-features.yaml"
        ))?;
        let text = features
            + "  - {name: amount_sd_1d, entity: customer_id, agg: stddev, of: amount, window: 1d}\n"
            + "  - {name: terminals_1d, entity: customer_id, agg: count_distinct, of: terminal_id, window: 1d}\n"
            + "rules:\n  - {id: r, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n";
        let bundle = RuleCompiler::new(&schema).compile_text(&text, 1)?;
        let layout = Layout::new(bundle.window_features());
        let names = |w: &Window| -> Vec<String> {
            w.readers
                .iter()
                .map(|r| bundle.window_features()[r.feature].name.clone())
                .collect()
        };
        // Per entity, per log (filter), the windows' features.
        let plan: Vec<Vec<Vec<Vec<String>>>> = layout
            .entities
            .iter()
            .map(|e| {
                e.logs
                    .iter()
                    .map(|l| l.windows.iter().map(names).collect())
                    .collect()
            })
            .collect();
        assert_eq!(
            plan,
            [
                vec![
                    vec![
                        vec!["cust_tx_count_1d"],
                        vec!["cust_tx_count_7d"],
                        vec!["cust_tx_count_30d"],
                        vec!["cust_avg_amount_1d", "cust_max_amount_1d", "amount_sd_1d"],
                        vec!["cust_avg_amount_7d"],
                        vec!["cust_avg_amount_30d"],
                        vec!["terminals_1d"],
                    ],
                    vec![vec!["cust_cnp_count_1h"]],
                ],
                vec![vec![vec!["term_tx_count_1d"], vec!["term_sum_amount_7d"]]],
            ]
        );
        // One log over the customer's events: two fields, three lengths, one walk.
        let log = &layout.entities[0].logs[0];
        assert_eq!(log.fields.len(), 2);
        assert_eq!(log.lengths, [86_400_000, 7 * 86_400_000, 30 * 86_400_000]);
        assert_eq!(log.summed, [0], "only the amount is summarized");
        assert!(!log.fields[0].distinct_only && log.fields[1].distinct_only);
        assert_eq!(log.reach_ms, 30 * 86_400_000);
        // The shared 1-day window keeps the second moment for the stddev.
        let shared = &log.windows[3];
        assert!(shared.shape.moments && shared.summarized && log.moments);
        assert_eq!((shared.length, shared.field, shared.slot), (0, Some(0), 0));
        assert!(!log.windows[0].shape.moments);
        // Identities depend on what a thing holds, not on its neighbours.
        let alone = RuleCompiler::new(&schema).compile_text(
            "features:\n  - {name: x, entity: customer_id, agg: max, of: amount, window: 1d}\nrules:\n  - {id: r, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
            2,
        )?;
        let alone = Layout::new(alone.window_features());
        assert_eq!(alone.entities[0].logs[0].windows[0].id, shared.id);
        assert_eq!(alone.entities[0].logs[0].id, log.id);
        assert_eq!(alone.entities[0].logs[0].field_ids[0], log.field_ids[0]);
        Ok(())
    }
}
