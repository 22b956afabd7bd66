//! `riskstream generate`: the demo's payment traffic (`generator`) produced to any Kafka cluster
//! at a steady rate, each event followed by its label (`{tx_id, fraud, scenario}`) on the labels
//! topic. It is the traffic source of the docker-compose pipeline and of load tests against a
//! real cluster.
//!
//! It owns pacing, the producer and its delivery accounting; it makes no events itself and
//! scores nothing. Unlike the demo it cannot see the pipeline, so it never waits for it: a
//! broker that is away is waited out by the producer (its queue is bounded, so the rate drops
//! to what the cluster takes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use riskstream_common::Config;
use riskstream_kafka::Role;

use crate::generator::{Generator, Scenario};

/// Settings of one `riskstream generate` run.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Events per second.
    pub rate: u64,
    /// Simulated time per wall-clock time until simulated time reaches the clock.
    pub speed: f64,
    /// How far behind the clock simulated time starts.
    pub history: Duration,
    /// Stop after this long; `None`: until a signal (or `count`).
    pub duration: Option<Duration>,
    /// Stop after this many events.
    pub count: Option<u64>,
    pub seed: u64,
    /// Topic of the labels; `None`: no labels.
    pub labels_topic: Option<String>,
    /// Prefix of event ids; distinct per run so that restarts never repeat ids.
    pub id_prefix: String,
}

/// What a run produced, for the final line.
#[derive(Debug, Default)]
pub struct Produced {
    pub events: u64,
    pub frauds: u64,
    pub malformed: u64,
    pub labels: u64,
    pub delivered: u64,
    pub failed: u64,
}

/// Counts acknowledgements; logs the first delivery failure (the rest are counted, and the
/// summary at exit reports them).
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

struct DeliveryCounter(Arc<Deliveries>);

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, message)) => {
                if self.0.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(topic = message.topic(), error = %e, "a generated record was not delivered");
                }
                0
            }
        };
    }
}

/// Produces until `stop`, the duration or the count; returns what was produced.
pub fn run(config: &Config, options: &GenerateOptions, stop: &AtomicBool) -> Result<Produced> {
    let deliveries = Arc::new(Deliveries::default());
    // riskstream's own producer settings (security properties included), tuned for a source:
    // batches of 10 ms, and a broker outage waited out rather than failed.
    let mut client = riskstream_kafka::client_config(&config.kafka, Role::Producer);
    client.set("linger.ms", "10");
    let producer: ThreadedProducer<DeliveryCounter> = client
        .create_with_context(DeliveryCounter(deliveries.clone()))
        .context("cannot create the generator's producer")?;

    let now = riskstream_pipeline::source::now_ms();
    let start_ms = now - i64::try_from(options.history.as_millis()).unwrap_or(i64::MAX / 2);
    let mut generator = Generator::new(options.rate as f64, options.speed, start_ms, options.seed)
        .with_id_prefix(&options.id_prefix);
    let topic = &config.kafka.topics.transactions;
    tracing::info!(
        brokers = %config.kafka.brokers,
        topic = %topic,
        labels = options.labels_topic.as_deref().unwrap_or("(none)"),
        rate = options.rate,
        customers = generator.customers(),
        "generating"
    );

    let mut out = Produced::default();
    let mut label = String::with_capacity(96);
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(10);
    loop {
        if stop.load(Ordering::Acquire)
            || options.duration.is_some_and(|d| started.elapsed() >= d)
            || options.count.is_some_and(|n| out.events >= n)
        {
            break;
        }
        let due = (started.elapsed().as_secs_f64() * options.rate as f64) as u64;
        let due = options.count.map_or(due, |n| due.min(n));
        if out.events >= due {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let now = riskstream_pipeline::source::now_ms();
        for _ in 0..(due - out.events).min(1000) {
            // Simulated time never runs ahead of the clock: the pipeline would see the future.
            generator.hold_clock(now);
            let event = generator.next_event();
            if !send(
                &producer,
                BaseRecord::to(topic).key(event.tx_id).payload(event.json),
                stop,
            )? {
                break;
            }
            out.events += 1;
            if event.malformed {
                out.malformed += 1;
                continue;
            }
            out.frauds += u64::from(event.scenario != Scenario::Genuine);
            if let Some(labels_topic) = &options.labels_topic {
                event.label(&mut label);
                if !send(
                    &producer,
                    BaseRecord::to(labels_topic)
                        .key(event.tx_id)
                        .payload(label.as_str()),
                    stop,
                )? {
                    break;
                }
                out.labels += 1;
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            tracing::info!(
                events = out.events,
                labels = out.labels,
                delivered = deliveries.delivered.load(Ordering::Relaxed),
                failed = deliveries.failed.load(Ordering::Relaxed),
                in_flight = producer.in_flight_count(),
                "generated"
            );
        }
    }
    // Whatever is still queued gets its chance; a stop by signal waits at most 10 s for it.
    let flush = if stop.load(Ordering::Acquire) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(60)
    };
    if let Err(e) = producer.flush(flush) {
        tracing::warn!(error = %e, in_flight = producer.in_flight_count(), "not every generated record was acknowledged before exit");
    }
    out.delivered = deliveries.delivered.load(Ordering::Relaxed);
    out.failed = deliveries.failed.load(Ordering::Relaxed);
    Ok(out)
}

/// Sends `record`, waiting while the producer's queue is full (the broker is slow or away);
/// `false` when `stop` was set while waiting, and the record was not sent.
pub fn send<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P>,
    stop: &AtomicBool,
) -> Result<bool>
where
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(true),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                if stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).context("the generator cannot produce"),
        }
    }
}
