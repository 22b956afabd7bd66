//! The demo's payment traffic: customers living in cities, shopping at nearby terminals and
//! online merchants, and four kinds of fraud woven in (the scenarios of the sample data,
//! `../shared/data/README.md`), each event carrying its ground truth.
//!
//! Simulated time runs faster than the wall clock (`speed`), so a half-minute demo covers weeks
//! of behaviour and day-long windows fill; the population is sized from the event rate so that
//! a customer makes a few payments a simulated day, as real cardholders do. This module only
//! makes events; it does not talk to Kafka.

use std::fmt::Write as _;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Ground truth of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    Genuine = 0,
    /// 1: a single amount far above anything genuine (over 220).
    HighAmount = 1,
    /// 2: a compromised terminal runs a burst of cloned cards.
    CompromisedTerminal = 2,
    /// 3: card details stolen: card-not-present purchases, amount ×5, shipped elsewhere.
    CardDetailsStolen = 3,
    /// 4: physical card stolen: a day of spending far from home, amount ×5.
    CardStolen = 4,
}

impl Scenario {
    pub const FRAUD: [Scenario; 4] = [
        Scenario::HighAmount,
        Scenario::CompromisedTerminal,
        Scenario::CardDetailsStolen,
        Scenario::CardStolen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Genuine => "genuine",
            Scenario::HighAmount => "high amount",
            Scenario::CompromisedTerminal => "compromised terminal",
            Scenario::CardDetailsStolen => "card details stolen",
            Scenario::CardStolen => "card stolen",
        }
    }
}

/// One generated event: its id, JSON and truth. `malformed` events are deliberately broken.
#[derive(Debug)]
pub struct Generated<'a> {
    pub tx_id: &'a str,
    pub json: &'a [u8],
    pub scenario: Scenario,
    pub malformed: bool,
}

impl Generated<'_> {
    /// The event's label as the labels topic carries it, `{tx_id, fraud, scenario}`, into `out`
    /// (cleared first).
    pub fn label(&self, out: &mut String) {
        out.clear();
        let _ = write!(
            out,
            r#"{{"tx_id":"{}","fraud":{},"scenario":{}}}"#,
            self.tx_id,
            u8::from(self.scenario != Scenario::Genuine),
            self.scenario as u8
        );
    }
}

struct Place {
    lat: f64,
    lon: f64,
}

struct Customer {
    city: usize,
    lat: f64,
    lon: f64,
    /// Median amount of the customer's payments.
    typical_amount: f64,
    /// Indices of the terminals the customer uses in person.
    terminals: [u32; 5],
}

struct StolenCard {
    customer: u32,
    until_ms: i64,
    /// The thief's city (stolen card) or delivery place (stolen details).
    lat: f64,
    lon: f64,
    city: usize,
}

struct Compromise {
    terminal: u32,
    until_ms: i64,
}

/// Makes events; see the module documentation.
pub struct Generator {
    rng: SmallRng,
    cities: Vec<Place>,
    customers: Vec<Customer>,
    /// In-person terminals, grouped by city.
    terminals: Vec<(usize, Place)>,
    terminals_by_city: Vec<Vec<u32>>,
    /// Online merchants (card-not-present), anywhere.
    merchants: Vec<Place>,
    /// Simulated milliseconds per generated event, on average.
    gap_ms: f64,
    sim_ms: f64,
    seq: u64,
    details_stolen: Vec<StolenCard>,
    cards_stolen: Vec<StolenCard>,
    compromised: Vec<Compromise>,
    /// Event ids are this prefix and a sequence number.
    id_prefix: String,
    tx_id: String,
    json: String,
}

/// Payments a customer makes per simulated day, on average.
const PAYMENTS_PER_DAY: f64 = 4.0;
const DAY_MS: f64 = 86_400_000.0;

impl Generator {
    /// A population for `rate` events per wall-clock second with simulated time running
    /// `speed` times faster, starting at simulated time `start_ms`. Deterministic per `seed`.
    pub fn new(rate: f64, speed: f64, start_ms: i64, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Events per simulated day = rate × 86400 / speed; customers make a few each.
        let per_sim_day = rate.max(1.0) * 86_400.0 / speed.max(1.0);
        let n_customers = ((per_sim_day / PAYMENTS_PER_DAY) as usize).clamp(200, 2_000_000);
        let n_cities = 24;
        // Cities across Europe.
        let cities: Vec<Place> = (0..n_cities)
            .map(|_| Place {
                lat: rng.random_range(37.0..60.0),
                lon: rng.random_range(-9.0..28.0),
            })
            .collect();
        let n_terminals = (n_customers / 2).max(50);
        let mut terminals = Vec::with_capacity(n_terminals);
        let mut terminals_by_city = vec![Vec::new(); n_cities];
        for i in 0..n_terminals {
            let city = i % n_cities;
            let (lat, lon) = near(&mut rng, &cities[city], 0.1);
            terminals.push((city, Place { lat, lon }));
            terminals_by_city[city].push(i as u32);
        }
        let merchants = (0..(n_terminals / 10).max(10))
            .map(|_| {
                let city = rng.random_range(0..n_cities);
                let (lat, lon) = near(&mut rng, &cities[city], 0.1);
                Place { lat, lon }
            })
            .collect();
        let customers = (0..n_customers)
            .map(|_| {
                let city = rng.random_range(0..n_cities);
                let (lat, lon) = near(&mut rng, &cities[city], 0.08);
                let local = &terminals_by_city[city];
                let mut mine = [0u32; 5];
                for t in &mut mine {
                    *t = local[rng.random_range(0..local.len())];
                }
                Customer {
                    city,
                    lat,
                    lon,
                    typical_amount: rng.random_range(8.0..60.0),
                    terminals: mine,
                }
            })
            .collect();
        Self {
            rng,
            cities,
            customers,
            terminals,
            terminals_by_city,
            merchants,
            gap_ms: DAY_MS / per_sim_day,
            sim_ms: start_ms as f64,
            seq: 0,
            details_stolen: Vec::new(),
            cards_stolen: Vec::new(),
            compromised: Vec::new(),
            id_prefix: "d-".to_string(),
            tx_id: String::with_capacity(24),
            json: String::with_capacity(512),
        }
    }

    /// Event ids start with `prefix` (default `d-`): a generator restarted with another prefix
    /// never repeats an earlier run's ids.
    pub fn with_id_prefix(mut self, prefix: &str) -> Self {
        self.id_prefix = prefix.to_string();
        self
    }

    /// Holds simulated time at `max_ms` at most: a generator that has caught up with the wall
    /// clock follows it instead of stamping events in the future.
    pub fn hold_clock(&mut self, max_ms: i64) {
        self.sim_ms = self.sim_ms.min(max_ms as f64);
    }

    /// Customers in the population.
    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    /// The next event.
    pub fn next_event(&mut self) -> Generated<'_> {
        self.sim_ms += self.gap_ms * exp1(&mut self.rng);
        let now = self.sim_ms as i64;
        self.seq += 1;
        self.start_incidents(now);
        self.tx_id.clear();
        let _ = write!(self.tx_id, "{}{}", self.id_prefix, self.seq);

        // Event time: usually now; 1% arrive out of order, by up to 20 simulated minutes.
        let ts = if self.rng.random_bool(0.01) {
            now - self.rng.random_range(0..1_200_000)
        } else {
            now
        };
        let roll: f64 = self.rng.random();
        let (scenario, tx) = if roll < 0.0015 {
            (Scenario::HighAmount, self.high_amount())
        } else if let Some(tx) = self.roll_incident(roll) {
            tx
        } else {
            (Scenario::Genuine, self.genuine())
        };
        // 0.1% of records are broken the ways real feeds break: a null amount, a wrong type,
        // truncated JSON.
        let malformed = self.rng.random_bool(0.001);
        self.json.clear();
        if malformed {
            match self.rng.random_range(0..3) {
                0 => {
                    let _ = write!(
                        self.json,
                        r#"{{"tx_id":"{}","ts":{ts},"customer_id":"C{}","terminal_id":"T{}","amount":null,"tx_type":"CP"}}"#,
                        self.tx_id, tx.customer, tx.terminal
                    );
                }
                1 => {
                    let _ = write!(
                        self.json,
                        r#"{{"tx_id":"{}","ts":{ts},"customer_id":"C{}","terminal_id":"T{}","amount":"12,50","tx_type":"CP"}}"#,
                        self.tx_id, tx.customer, tx.terminal
                    );
                }
                _ => {
                    let _ = write!(
                        self.json,
                        r#"{{"tx_id":"{}","ts":{ts},"customer_id""#,
                        self.tx_id
                    );
                }
            }
        } else {
            let c = &self.customers[tx.customer as usize];
            let _ = write!(
                self.json,
                r#"{{"tx_id":"{}","ts":{ts},"customer_id":"C{}","terminal_id":"{}{}","amount":{:.2},"tx_type":"{}","bill_lat":{:.5},"bill_lon":{:.5},"term_lat":{:.5},"term_lon":{:.5},"#,
                self.tx_id,
                tx.customer,
                if tx.online { "M" } else { "T" },
                tx.terminal,
                tx.amount,
                if tx.online { "CNP" } else { "CP" },
                c.lat,
                c.lon,
                tx.term.0,
                tx.term.1,
            );
            match tx.ship {
                Some((lat, lon)) => {
                    let _ = write!(self.json, r#""ship_lat":{lat:.5},"ship_lon":{lon:.5}}}"#);
                }
                None => self.json.push_str(r#""ship_lat":null,"ship_lon":null}"#),
            }
        }
        Generated {
            tx_id: &self.tx_id,
            json: self.json.as_bytes(),
            scenario,
            malformed,
        }
    }

    /// Starts new incidents at their simulated-time rates; ends expired ones.
    fn start_incidents(&mut self, now: i64) {
        let per_event_day = self.gap_ms / DAY_MS;
        let n = self.customers.len() as f64;
        self.details_stolen.retain(|s| s.until_ms > now);
        self.cards_stolen.retain(|s| s.until_ms > now);
        self.compromised.retain(|c| c.until_ms > now);
        // About 0.2% of customers a day lose their card details, 0.1% their card; about one
        // terminal in 2,000 a day is compromised.
        if self.rng.random_bool((0.002 * n * per_event_day).min(1.0)) {
            let customer = self.rng.random_range(0..self.customers.len()) as u32;
            let city = self.rng.random_range(0..self.cities.len());
            let (lat, lon) = near(&mut self.rng, &self.cities[city], 0.1);
            self.details_stolen.push(StolenCard {
                customer,
                until_ms: now + 3 * DAY_MS as i64,
                lat,
                lon,
                city,
            });
        }
        if self.rng.random_bool((0.001 * n * per_event_day).min(1.0)) {
            let customer = self.rng.random_range(0..self.customers.len()) as u32;
            let home = self.customers[customer as usize].city;
            let city =
                (home + 1 + self.rng.random_range(0..self.cities.len() - 1)) % self.cities.len();
            let (lat, lon) = near(&mut self.rng, &self.cities[city], 0.05);
            self.cards_stolen.push(StolenCard {
                customer,
                until_ms: now + DAY_MS as i64,
                lat,
                lon,
                city,
            });
        }
        let terminals = self.terminals.len() as f64;
        if self
            .rng
            .random_bool((terminals / 2000.0 * per_event_day).min(1.0))
        {
            let terminal = self.rng.random_range(0..self.terminals.len()) as u32;
            self.compromised.push(Compromise {
                terminal,
                until_ms: now + 2 * 3_600_000,
            });
        }
    }

    /// A fraudulent transaction of an ongoing incident, if this roll lands on one.
    fn roll_incident(&mut self, roll: f64) -> Option<(Scenario, Tx)> {
        // Per-incident rates in events per simulated hour, converted to a share of events.
        let per_hour = self.gap_ms / 3_600_000.0;
        let p_terminal = self.compromised.len() as f64 * 15.0 * per_hour;
        let p_details = self.details_stolen.len() as f64 * 0.1 * per_hour;
        let p_card = self.cards_stolen.len() as f64 * 0.6 * per_hour;
        let mut edge = 0.0015;
        edge += p_terminal;
        if roll < edge {
            let i = self.rng.random_range(0..self.compromised.len());
            let terminal = self.compromised[i].terminal;
            let customer = self.rng.random_range(0..self.customers.len()) as u32;
            let place = &self.terminals[terminal as usize].1;
            let tx = Tx {
                customer,
                terminal,
                online: false,
                amount: self.rng.random_range(5.0..60.0),
                term: (place.lat, place.lon),
                ship: None,
            };
            return Some((Scenario::CompromisedTerminal, tx));
        }
        edge += p_details;
        if roll < edge {
            let s = &self.details_stolen[self.rng.random_range(0..self.details_stolen.len())];
            let (customer, lat, lon) = (s.customer, s.lat, s.lon);
            let typical = self.customers[customer as usize].typical_amount;
            let merchant = self.rng.random_range(0..self.merchants.len());
            let m = &self.merchants[merchant];
            let tx = Tx {
                customer,
                terminal: merchant as u32,
                online: true,
                amount: (amount(&mut self.rng, typical) * 5.0).min(219.0),
                term: (m.lat, m.lon),
                ship: Some((lat, lon)),
            };
            return Some((Scenario::CardDetailsStolen, tx));
        }
        edge += p_card;
        if roll < edge {
            let s = &self.cards_stolen[self.rng.random_range(0..self.cards_stolen.len())];
            let (customer, city) = (s.customer, s.city);
            let typical = self.customers[customer as usize].typical_amount;
            let local = &self.terminals_by_city[city];
            let terminal = local[self.rng.random_range(0..local.len())];
            let place = &self.terminals[terminal as usize].1;
            let tx = Tx {
                customer,
                terminal,
                online: false,
                amount: (amount(&mut self.rng, typical) * 5.0).min(219.0),
                term: (place.lat, place.lon),
                ship: None,
            };
            return Some((Scenario::CardStolen, tx));
        }
        None
    }

    fn high_amount(&mut self) -> Tx {
        let mut tx = self.genuine();
        tx.amount = self.rng.random_range(221.0..2500.0);
        tx
    }

    fn genuine(&mut self) -> Tx {
        let customer = self.rng.random_range(0..self.customers.len()) as u32;
        let c = &self.customers[customer as usize];
        let amount = amount(&mut self.rng, c.typical_amount);
        if self.rng.random_bool(0.3) {
            // Online: shipped home, now and then (a gift) somewhere else.
            let merchant = self.rng.random_range(0..self.merchants.len());
            let m = &self.merchants[merchant];
            let ship = if self.rng.random_bool(0.005) {
                let city = self.rng.random_range(0..self.cities.len());
                near(&mut self.rng, &self.cities[city], 0.1)
            } else {
                (c.lat, c.lon)
            };
            Tx {
                customer,
                terminal: merchant as u32,
                online: true,
                amount,
                term: (m.lat, m.lon),
                ship: Some(ship),
            }
        } else {
            // In person: one of the customer's terminals, or (1%) while travelling.
            let terminal = if self.rng.random_bool(0.01) {
                self.rng.random_range(0..self.terminals.len()) as u32
            } else {
                c.terminals[self.rng.random_range(0..c.terminals.len())]
            };
            let place = &self.terminals[terminal as usize].1;
            Tx {
                customer,
                terminal,
                online: false,
                amount,
                term: (place.lat, place.lon),
                ship: None,
            }
        }
    }
}

struct Tx {
    customer: u32,
    terminal: u32,
    online: bool,
    amount: f64,
    term: (f64, f64),
    ship: Option<(f64, f64)>,
}

/// A genuine amount around `typical` (log-normal), never above 220.
fn amount(rng: &mut SmallRng, typical: f64) -> f64 {
    (typical * (0.45 * normal(rng)).exp()).clamp(1.0, 220.0)
}

/// A place within about `spread` degrees of `center`.
fn near(rng: &mut SmallRng, center: &Place, spread: f64) -> (f64, f64) {
    (
        center.lat + spread * normal(rng),
        center.lon + spread * normal(rng),
    )
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// An exponential sample with mean 1 (gaps between events).
fn exp1(rng: &mut SmallRng) -> f64 {
    -rng.random_range(f64::EPSILON..1.0).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_clock_stamps_no_event_past_it_and_ids_carry_the_prefix() {
        // Simulated time far faster than the clock: held, events stay at or before the bound.
        let start = 1_700_000_000_000;
        // 1,000 events/s at 1,000x: a simulated second between events, on average.
        let mut g = Generator::new(1_000.0, 1_000.0, start, 3).with_id_prefix("run7-");
        let bound = start + 60_000;
        let mut at_bound = 0;
        for _ in 0..5_000 {
            g.hold_clock(bound);
            let e = g.next_event();
            assert!(e.tx_id.starts_with("run7-"), "{}", e.tx_id);
            if e.malformed {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(e.json).unwrap_or_default();
            let ts = v["ts"].as_i64().unwrap_or(i64::MAX);
            // One event's gap past the bound at most (the hold applies before each event):
            // exponential with a 1 s mean, so 30 s is never reached in practice.
            assert!(ts <= bound + 30_000, "{ts} past {bound}");
            at_bound += u64::from(ts >= bound - 1_200_000);
        }
        assert!(at_bound > 4_000, "simulated time never reached the bound");
    }

    #[test]
    fn events_are_valid_json_with_every_scenario_and_realistic_activity() {
        // 20K events/s, simulated time 40,000x: 10 wall seconds = 200K events, ~4.6 days.
        let mut g = Generator::new(20_000.0, 40_000.0, 1_700_000_000_000, 7);
        let mut by_scenario = std::collections::BTreeMap::new();
        let mut malformed = 0;
        let mut first_ts = None;
        let mut last_ts = 0;
        for _ in 0..200_000 {
            let e = g.next_event();
            if e.malformed {
                malformed += 1;
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(e.json).unwrap_or_default();
            assert_eq!(v["tx_id"].as_str(), Some(e.tx_id));
            let amount = v["amount"].as_f64().unwrap_or(-1.0);
            assert!(amount > 0.0, "{v}");
            assert_eq!(amount > 220.0, e.scenario == Scenario::HighAmount, "{v}");
            let ts = v["ts"].as_i64().unwrap_or(0);
            first_ts.get_or_insert(ts);
            last_ts = ts;
            *by_scenario.entry(e.scenario).or_insert(0u64) += 1;
        }
        for s in Scenario::FRAUD {
            assert!(
                by_scenario.get(&s).copied().unwrap_or(0) > 20,
                "{by_scenario:?}"
            );
        }
        let fraud: u64 = Scenario::FRAUD.iter().map(|s| by_scenario[s]).sum();
        let share = fraud as f64 / 200_000.0;
        assert!((0.002..0.05).contains(&share), "fraud share {share}");
        assert!((100..400).contains(&malformed), "{malformed}");
        let days = (last_ts - first_ts.unwrap_or(0)) as f64 / DAY_MS;
        assert!((3.5..6.0).contains(&days), "{days} simulated days");
        // A few payments per customer and day.
        let per_customer_day = 200_000.0 / g.customers() as f64 / days;
        assert!((2.0..8.0).contains(&per_customer_day), "{per_customer_day}");
    }
}
