//! Shared inputs for the criterion benchmarks in `benches/benches/`.
//!
//! Events follow workload W1 (`../shared/bench/gen_w1.py`): the demo payment schema, skewed
//! customer and terminal keys, log-normal amounts, about 260 bytes of JSON each. They are
//! generated here, deterministically, so the benchmarks need no input files.

use riskstream_common::{Position, RawBatch};

/// A small deterministic generator (xorshift64*), enough for benchmark inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A skewed key in [0, n): a few hot keys, a long tail.
    pub fn skewed(&mut self, n: u64) -> u64 {
        let u = self.f64().max(1e-12);
        ((u.powf(3.0) * n as f64) as u64 + self.next_u64() % 7) % n
    }
}

/// `n` W1-style events as JSON lines (no trailing newline per record).
pub fn w1_events(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let start_ms: i64 = 1_735_689_600_000;
    (0..n)
        .map(|i| {
            let ts = start_ms + i as i64 * 432 + (rng.next_u64() % 1000) as i64;
            let secs = ts / 1000;
            let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            let day = 1 + (secs - start_ms / 1000) / 86_400;
            let amount = (3.5 + (rng.f64() - 0.5) * 3.0).exp();
            let mut coord = |lo: f64, hi: f64| lo + (hi - lo) * rng.f64();
            let lat = [coord(-30.0, 0.0), coord(-30.0, 0.0), coord(-30.0, 0.0)];
            let lon = [coord(-60.0, -35.0), coord(-60.0, -35.0), coord(-60.0, -35.0)];
            format!(
                r#"{{"tx_id":"w{i}","ts":"2025-01-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z","customer_id":"c{c}","terminal_id":"t{t}","amount":{amount:.2},"tx_type":"{ty}","bill_lat":{:.6},"bill_lon":{:.6},"term_lat":{:.6},"term_lon":{:.6},"ship_lat":{:.6},"ship_lon":{:.6}}}"#,
                lat[0],
                lon[0],
                lat[1],
                lon[1],
                lat[2],
                lon[2],
                ms = ts % 1000,
                c = rng.skewed(200_000),
                t = rng.skewed(50_000),
                ty = if rng.f64() < 0.4 { "CNP" } else { "CP" },
            )
        })
        .collect()
}

/// Packs events into raw batches of `batch` records.
pub fn raw_batches(events: &[String], batch: usize) -> Vec<RawBatch> {
    events
        .chunks(batch)
        .enumerate()
        .map(|(b, chunk)| {
            let mut raw = RawBatch::new();
            for (i, e) in chunk.iter().enumerate() {
                raw.push(
                    e.as_bytes(),
                    Position {
                        partition: 0,
                        offset: (b * batch + i) as i64,
                    },
                    0,
                );
            }
            raw
        })
        .collect()
}

/// A bundle of `n` row-level rules of mixed shapes over the demo schema.
pub fn rule_bundle(n: usize) -> String {
    let mut text = String::from("rules:\n");
    for i in 0..n {
        let k = i as f64;
        let when = match i % 6 {
            0 => format!("amount > {}", 100.0 + k * 7.0),
            1 => format!("tx_type = 'CNP' AND amount > {}", 50.0 + k * 3.0),
            2 => format!(
                "bill_lat < {} AND term_lon > {}",
                -25.0 + k * 0.1,
                -40.0 - k * 0.1
            ),
            3 => format!("amount BETWEEN {} AND {}", k, k + 5.0),
            4 => format!("customer_id = 'c{}' OR terminal_id = 't{}'", i * 13, i * 7),
            _ => format!("amount * 2 > {} AND tx_type = 'CP'", 300.0 + k),
        };
        text.push_str(&format!(
            "  - {{id: r{i}, when: \"{when}\", score: {}}}\n",
            5 + i % 20
        ));
    }
    text.push_str("decision: {review_at: 40, block_at: 80}\n");
    text
}
