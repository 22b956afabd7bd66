//! How a bundle's windowed features map onto state.
//!
//! Features over the same key fields form an *entity*: one record per key. Within an entity,
//! features that aggregate the same events share one *window*: `count`, `sum`, `avg`, `min`,
//! `max` and `stddev` over the same window length, `where` filter and `of` field, so
//! `cust_avg_amount_1d` and `cust_max_amount_1d` keep the customer's events once and read one
//! summary. `count_distinct`, `last` and `seconds_since_last` keep windows of their own.
//!
//! A window's identity is a stable hash of what it holds (entity, length, filter, field, and the
//! aggregation for windows of their own), never of which other features exist: a feature whose
//! definition a reload leaves unchanged keeps its state, and a feature a reload adds over events
//! a window already holds starts with them.
//!
//! This module only plans; the operator reads batches and state.

use riskstream_rules::{Agg, CompiledWindowFeature};

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
    pub windows: Vec<Window<'a>>,
}

/// One window per key of an entity, read by one or more features.
#[derive(Debug)]
pub(crate) struct Window<'a> {
    pub id: [u8; 8],
    pub shape: Shape,
    /// The feature whose `where` and `of` decide which events (and values) the window holds.
    pub source: &'a CompiledWindowFeature,
    pub readers: Vec<Reader>,
    /// Some reader uses the window's summary (all but `count_distinct`, `last`,
    /// `seconds_since_last`).
    pub summarized: bool,
}

/// A feature read from a window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader {
    /// Index of the feature in the bundle's windowed features (and of its output column).
    pub feature: usize,
    pub agg: Agg,
    /// A `count` without a field: counts events (the window holds no values).
    pub counts_events: bool,
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
                    windows: Vec::new(),
                });
                self.entities.len() - 1
            }
        };
        let entity = &mut self.entities[at];
        let reader = Reader {
            feature: index,
            agg: spec.agg,
            counts_events: spec.agg == Agg::Count && spec.of.is_none(),
        };
        let window_ms = feature.window_ms();
        let shared = if summarized(spec.agg) {
            entity.windows.iter_mut().find(|w| {
                let s = &w.source.spec;
                w.summarized
                    && w.shape.window_ms == window_ms
                    && s.filter == spec.filter
                    && s.of == spec.of
            })
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
                entity.windows.push(Window {
                    id,
                    shape: Shape::new(window_ms, spec.agg == Agg::Stddev),
                    source: feature,
                    readers: vec![reader],
                    summarized: summarized(spec.agg),
                });
            }
        }
    }

    /// Every window, with the entity it belongs to.
    pub fn windows(&self) -> impl Iterator<Item = &Window<'a>> {
        self.entities.iter().flat_map(|e| e.windows.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use riskstream_common::Config;
    use riskstream_rules::RuleCompiler;

    #[test]
    fn features_over_the_same_events_share_a_window() -> Result<(), Box<dyn std::error::Error>> {
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
        let plan: Vec<Vec<Vec<String>>> = layout
            .entities
            .iter()
            .map(|e| e.windows.iter().map(names).collect())
            .collect();
        assert_eq!(
            plan,
            [
                vec![
                    vec!["cust_tx_count_1d"],
                    vec!["cust_tx_count_7d"],
                    vec!["cust_tx_count_30d"],
                    vec!["cust_avg_amount_1d", "cust_max_amount_1d", "amount_sd_1d"],
                    vec!["cust_avg_amount_7d"],
                    vec!["cust_avg_amount_30d"],
                    vec!["cust_cnp_count_1h"],
                    vec!["terminals_1d"],
                ],
                vec![vec!["term_tx_count_1d"], vec!["term_sum_amount_7d"]],
            ]
        );
        // The shared 1-day window keeps the second moment for the stddev.
        let shared = &layout.entities[0].windows[3];
        assert!(shared.shape.moments && shared.summarized);
        assert!(!layout.entities[0].windows[0].shape.moments);
        // Identities depend on what a window holds, not on its neighbours.
        let alone = RuleCompiler::new(&schema).compile_text(
            "features:\n  - {name: x, entity: customer_id, agg: max, of: amount, window: 1d}\nrules:\n  - {id: r, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
            2,
        )?;
        assert_eq!(
            Layout::new(alone.window_features()).entities[0].windows[0].id,
            shared.id
        );
        Ok(())
    }
}
