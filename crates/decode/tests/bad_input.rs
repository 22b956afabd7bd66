//! Every kind of bad record, mixed into good ones: each bad record becomes a dead letter with the
//! right reason, every good record is decoded, in order, with its position.

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, TimestampMillisecondType};
use riskstream_common::{Config, DeadReason, Position, RawBatch};
use riskstream_decode::EventDecoder;

fn good(id: &str, ts: &str, amount: &str) -> String {
    format!(
        r#"{{"tx_id":"{id}","ts":{ts},"customer_id":"c1","terminal_id":"t1","amount":{amount},"tx_type":"CNP","bill_lat":1.0,"bill_lon":2.0,"term_lat":3.0,"term_lon":4.0,"ship_lat":5.0,"ship_lon":6.0}}"#
    )
}

fn batch(records: &[String]) -> RawBatch {
    let mut raw = RawBatch::new();
    for (i, r) in records.iter().enumerate() {
        raw.push(
            r.as_bytes(),
            Position {
                partition: 3,
                offset: 100 + i as i64,
            },
            0,
        );
    }
    raw
}

fn decoder(capacity: usize) -> EventDecoder {
    let config = Config::defaults().unwrap_or_else(|e| panic!("defaults: {e}"));
    let schema = config
        .event_schema()
        .unwrap_or_else(|e| panic!("schema: {e}"));
    EventDecoder::new(&schema, capacity).unwrap_or_else(|e| panic!("decoder: {e}"))
}

#[test]
fn each_kind_of_bad_record_is_dead_lettered_with_its_reason() {
    let ts = r#""2025-01-01T00:00:13Z""#;
    let oversized = good(
        "big",
        ts,
        &format!("1.0, \"pad\":\"{}\"", "x".repeat(70_000)),
    );
    let cases: Vec<(String, Option<(DeadReason, &str)>)> = vec![
        (good("ok-0", ts, "10.5"), None),
        (
            r#"{"tx_id":"broken","ts":"2025-01-01T00:00:13Z","amount":"#.to_string(),
            Some((DeadReason::InvalidJson, "invalid JSON")),
        ),
        (good("ok-1", "1735689613000", "11"), None),
        (
            "[1,2,3]".to_string(),
            Some((DeadReason::NotAnObject, "found an array")),
        ),
        (
            good("missing", ts, "1").replace(r#""amount":1,"#, ""),
            Some((DeadReason::MissingField, "`amount` is missing")),
        ),
        (
            good("null", ts, "null"),
            Some((DeadReason::NullField, "`amount` is null")),
        ),
        (
            good("wrong", ts, r#""abc""#),
            Some((DeadReason::WrongType, "`amount` must be a number")),
        ),
        (
            good("wrong-obj", ts, r#"{"value":1}"#),
            Some((DeadReason::WrongType, "found an object")),
        ),
        (
            good("bad-ts", r#""yesterday""#, "1"),
            Some((DeadReason::InvalidValue, "cannot be converted")),
        ),
        (
            oversized,
            Some((DeadReason::Oversized, "schema.max_event_bytes")),
        ),
        (
            format!("{} {}", good("two-a", ts, "1"), good("two-b", ts, "1")),
            Some((DeadReason::InvalidJson, "trailing characters")),
        ),
        (
            String::new(),
            Some((DeadReason::InvalidJson, "record is empty")),
        ),
        // Optional fields may be null or absent; unknown fields are ignored.
        (
            good("ok-2", ts, "12").replace(r#""ship_lat":5.0"#, r#""ship_lat":null"#),
            None,
        ),
        (
            good("ok-3", ts, "13").replace(r#","ship_lon":6.0"#, r#","extra":{"a":[1]}"#),
            None,
        ),
        (
            good("ok-4", r#""2025-01-01T00:00:14.250+01:00""#, "14"),
            None,
        ),
    ];
    let records: Vec<String> = cases.iter().map(|(r, _)| r.clone()).collect();
    let raw = batch(&records);

    // Capacity 4 also exercises splitting a raw batch over several decoder passes.
    for capacity in [4, 4096] {
        let decoded = decoder(capacity)
            .decode(&raw)
            .unwrap_or_else(|e| panic!("{e}"));

        let expected_dead: Vec<_> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, (_, e))| e.map(|e| (i, e)))
            .collect();
        assert_eq!(
            decoded.dead.len(),
            expected_dead.len(),
            "{:#?}",
            decoded.dead
        );
        for (dead, (index, (reason, words))) in decoded.dead.iter().zip(&expected_dead) {
            assert_eq!(dead.record, *index);
            assert_eq!(dead.reason, *reason, "record {index}: {}", dead.detail);
            assert!(
                dead.detail.contains(words),
                "record {index}: {:?} should mention {words:?}",
                dead.detail
            );
        }

        let good_indexes: Vec<u32> = cases
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| e.is_none())
            .map(|(i, _)| i as u32)
            .collect();
        assert_eq!(decoded.rows, good_indexes);
        let ids = decoded.batch.column(0).as_string::<i32>();
        let ids: Vec<&str> = (0..ids.len()).map(|i| ids.value(i)).collect();
        assert_eq!(ids, ["ok-0", "ok-1", "ok-2", "ok-3", "ok-4"]);
        let ts = decoded
            .batch
            .column(1)
            .as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_735_689_613_000);
        assert_eq!(ts.value(1), 1_735_689_613_000, "epoch milliseconds");
        assert_eq!(
            ts.value(4),
            1_735_689_614_250 - 3_600_000,
            "offset honoured"
        );
        let amount = decoded.batch.column(4).as_primitive::<Float64Type>();
        assert_eq!(amount.value(0), 10.5);
        let ship_lat = decoded.batch.column(10).as_primitive::<Float64Type>();
        assert!(ship_lat.is_null(2));
        assert_eq!(raw.position(decoded.dead[0].record).offset, 101);
    }
}

#[test]
fn a_batch_of_only_bad_records_yields_an_empty_batch() {
    let raw = batch(&["nope".to_string(), "{}".to_string()]);
    let decoded = decoder(16).decode(&raw).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded.batch.num_rows(), 0);
    assert!(decoded.rows.is_empty());
    let reasons: Vec<_> = decoded.dead.iter().map(|d| d.reason).collect();
    assert_eq!(reasons, [DeadReason::InvalidJson, DeadReason::MissingField]);
}

#[test]
fn the_decoder_recovers_after_a_bad_batch() {
    let mut decoder = decoder(16);
    let ts = r#""2025-01-01T00:00:13Z""#;
    let bad = batch(&[good("a", ts, "1"), "{\"tx_id\":".to_string()]);
    let decoded = decoder.decode(&bad).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded.batch.num_rows(), 1);
    assert_eq!(decoded.dead.len(), 1);
    let next = batch(&[good("b", ts, "2"), good("c", ts, "3")]);
    let decoded = decoder.decode(&next).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded.batch.num_rows(), 2);
    assert!(decoded.dead.is_empty());
}
