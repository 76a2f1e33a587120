//! The catalog fold and the event parser, in process: what one discovery
//! core can take before NATS is involved at all.
//!
//! Run with `cargo bench --bench fold`. The goal (DESIGN.md) is 2,000,000
//! heartbeats/s on the no-op path: a heartbeat from a known instance whose
//! record did not change moves a deadline and publishes nothing. Discovery
//! takes that path as `parse/repeated_heartbeat_10k` measures it.
//!
//! The fleet is 10,000 live instances over 100 services, every record about
//! 200 bytes of JSON, as an agent publishes it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rollcall::catalog::{payload_digest, Catalog};
use rollcall::protocol::{Event, EventKind, Instance, Subjects};

const SERVICES: usize = 100;
const PER_SERVICE: usize = 100;
const FLEET: usize = SERVICES * PER_SERVICE;

fn instance(service: usize, n: usize) -> Instance {
    let mut instance = Instance::new(
        format!("svc-{service:03}"),
        format!("svc-{service:03}-{n:03}"),
        format!("10.{}.{}.{}", service, n / 256, n % 256),
        8080,
    );
    instance.tags = vec!["v2".into(), "blue".into()];
    instance.meta.insert("zone".into(), "eu-west-1a".into());
    instance
        .meta
        .insert("version".into(), "2.14.3-build.7".into());
    instance.meta.insert("team".into(), "checkout-web".into());
    instance
}

fn fleet() -> Vec<Instance> {
    (0..SERVICES)
        .flat_map(|s| (0..PER_SERVICE).map(move |n| instance(s, n)))
        .collect()
}

fn catalog_of(fleet: &[Instance], now: Instant) -> Catalog {
    let mut catalog = Catalog::new();
    for instance in fleet {
        catalog.apply(Event::Register(instance.clone()), now);
    }
    assert_eq!(catalog.live_instances(), fleet.len());
    catalog
}

/// `(subject, payload)` of every instance's heartbeat, as NATS delivers them.
fn heartbeat_messages(subjects: &Subjects, fleet: &[Instance]) -> Vec<(String, Vec<u8>)> {
    fleet
        .iter()
        .map(|i| {
            let subject = subjects.event(EventKind::Heartbeat, &i.service, &i.id);
            let payload = serde_json::to_vec(i).expect("an Instance serializes");
            (subject, payload)
        })
        .collect()
}

fn heartbeats(fleet: &[Instance]) -> Vec<Event> {
    fleet.iter().cloned().map(Event::Heartbeat).collect()
}

fn fold(c: &mut Criterion) {
    let fleet = fleet();
    let t0 = Instant::now();
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(FLEET as u64));

    // The events are built outside the timed part; dropping the Instance a
    // no-op heartbeat carries is inside it, as it is in discovery.
    let mut catalog = catalog_of(&fleet, t0);
    let mut now = t0;
    group.bench_function("heartbeat_noop_10k", |b| {
        b.iter_batched(
            || heartbeats(&fleet),
            |events| {
                now += Duration::from_millis(1);
                for event in events {
                    black_box(catalog.apply(event, now));
                }
            },
            BatchSize::LargeInput,
        )
    });
    assert_eq!(catalog.live_instances(), FLEET);

    // One instance of each service leaves and another joins: two changes,
    // each a new revision, per element.
    let mut catalog = catalog_of(&fleet, t0);
    let newcomers: Vec<Instance> = (0..SERVICES)
        .flat_map(|s| (PER_SERVICE..2 * PER_SERVICE).map(move |n| instance(s, n)))
        .collect();
    let mut round = 0usize;
    group.bench_function("register_deregister_churn_10k", |b| {
        b.iter_batched(
            || {
                // Even rounds swap the fleet for the newcomers, odd rounds back.
                let (leaving, joining) = if round % 2 == 0 {
                    (&fleet, &newcomers)
                } else {
                    (&newcomers, &fleet)
                };
                round += 1;
                leaving
                    .iter()
                    .zip(joining)
                    .flat_map(|(gone, new)| {
                        [
                            Event::Deregister {
                                service: gone.service.clone(),
                                id: gone.id.clone(),
                            },
                            Event::Register(new.clone()),
                        ]
                    })
                    .collect::<Vec<_>>()
            },
            |events| {
                for event in events {
                    black_box(catalog.apply(event, t0));
                }
            },
            BatchSize::LargeInput,
        )
    });
    // Register/deregister pairs leave the catalog's size where it was.
    assert_eq!(catalog.live_instances(), FLEET);

    group.bench_function("expire_10k", |b| {
        b.iter_batched(
            || catalog_of(&fleet, t0),
            |mut catalog| {
                let gone = catalog.expire(t0 + Duration::from_secs(60));
                assert_eq!(gone.len(), FLEET);
                catalog
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn parse(c: &mut Criterion) {
    let fleet = fleet();
    let subjects = Subjects::default();
    let messages = heartbeat_messages(&subjects, &fleet);
    let mean_len = messages.iter().map(|(_, p)| p.len()).sum::<usize>() / messages.len();
    assert!(
        (180..=230).contains(&mean_len),
        "heartbeats should be about 200 bytes, are {mean_len}"
    );
    let t0 = Instant::now();

    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(FLEET as u64));
    group.bench_function("parse_event_heartbeat_10k", |b| {
        b.iter(|| {
            for (subject, payload) in &messages {
                black_box(subjects.parse_event(subject, payload).expect("valid"));
            }
        })
    });

    let mut catalog = catalog_of(&fleet, t0);
    let mut now = t0;
    group.bench_function("parse_and_apply_heartbeat_10k", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            for (subject, payload) in &messages {
                let event = subjects.parse_event(subject, payload).expect("valid");
                black_box(catalog.apply(event, now));
            }
        })
    });
    // What discovery does with a heartbeat that repeats the last one byte
    // for byte (the usual case): split the subject, digest the payload, move
    // the deadline. No JSON parse, no allocation.
    let mut catalog = catalog_of(&fleet, t0);
    for (subject, payload) in &messages {
        let (_, service, id) = subjects.parse_event_subject(subject).expect("valid");
        catalog.set_digest(service, id, payload_digest(payload));
    }
    let mut now = t0;
    group.bench_function("repeated_heartbeat_10k", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            for (subject, payload) in &messages {
                let (_, service, id) = subjects.parse_event_subject(subject).expect("valid");
                let refreshed = catalog.refresh(service, id, payload_digest(payload), now);
                assert!(black_box(refreshed));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, fold, parse);
criterion_main!(benches);
