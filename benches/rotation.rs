//! The balancer's round-robin pick: what one request pays to learn where it
//! goes (`Rotation::load()` plus `ServiceSet::next()`).
//!
//! Run with `cargo bench --bench rotation`. Single thread with 3 and 100
//! equal-weight instances, with one of 3 ejected (the pick then reads the
//! clock and skips), weighted, and two threads picking from the same
//! rotation at once (the cursor's cache line bounces between the cores).
//! And what a catalog change costs the balancer: building the set of
//! 100,000 instances with mixed weights (1 to 4) from nothing, and
//! rebuilding it after one of them left.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rollcall::balancer::rotation::Rotation;
use rollcall::protocol::{Instance, Snapshot};

fn snapshot(revision: u64, instances: usize, weights: impl Fn(usize) -> u32) -> Snapshot {
    Snapshot {
        service: "web".into(),
        revision,
        instances: (0..instances)
            .map(|n| {
                let port = 9000 + (n % 50_000) as u16;
                let mut i = Instance::new("web", format!("web-{n:04}"), "127.0.0.1", port);
                i.weight = weights(n);
                i
            })
            .collect(),
    }
}

fn rotation(instances: usize, weights: impl Fn(usize) -> u32) -> Rotation {
    let rotation = Rotation::new("web");
    rotation.apply(&snapshot(1, instances, weights));
    rotation
}

/// One pick, the way the proxy makes it; returns something of the member so
/// the pick cannot be optimised away.
fn pick(rotation: &Rotation) -> usize {
    let set = rotation.load();
    set.next(Instant::now).map_or(0, |m| m.id().len())
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("rotation");
    group.throughput(Throughput::Elements(1));
    for (name, rotation) in [
        ("next_3_equal", rotation(3, |_| 1)),
        ("next_100_equal", rotation(100, |_| 1)),
        ("next_3_weighted_5_3_1", rotation(3, |n| [5, 3, 1][n])),
    ] {
        group.bench_function(name, |b| b.iter(|| black_box(pick(&rotation))));
    }
    let ejected = rotation(3, |_| 1);
    ejected
        .eject("web-0001", Instant::now() + Duration::from_secs(3600))
        .expect("web-0001 is in the set");
    group.bench_function("next_3_one_ejected", |b| {
        b.iter(|| black_box(pick(&ejected)))
    });
    group.finish();
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("rotation_contended");
    // One iteration is one pick on each of the two threads, at the same time.
    group.throughput(Throughput::Elements(2));
    let shared = Arc::new(rotation(3, |_| 1));
    group.bench_function("next_3_equal_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Arc::new(Barrier::new(2));
            let other = {
                let (shared, start) = (Arc::clone(&shared), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..iters {
                        black_box(pick(&shared));
                    }
                })
            };
            start.wait();
            let t0 = Instant::now();
            for _ in 0..iters {
                black_box(pick(&shared));
            }
            other.join().expect("the other picker does not panic");
            t0.elapsed()
        })
    });
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("rotation_build");
    group.sample_size(10);
    let mixed = |n: usize| 1 + (n % 4) as u32;
    let full = snapshot(1, 100_000, mixed);
    group.bench_function("apply_100k_mixed_from_empty", |b| {
        b.iter_with_large_drop(|| {
            let rotation = Rotation::new("web");
            rotation.apply(&full);
            rotation
        })
    });
    let mut one_left = snapshot(2, 100_000, mixed);
    one_left.instances.remove(50_000);
    let steady = rotation(100_000, mixed);
    let mut flip = false;
    group.bench_function("apply_100k_mixed_one_left", |b| {
        b.iter(|| {
            // Alternate the two sets (the rotation does not check revisions;
            // the feed does) so each apply is a real change.
            flip = !flip;
            steady.apply(if flip { &one_left } else { &full })
        })
    });
    group.finish();
}

criterion_group!(benches, single_thread, contended, build);
criterion_main!(benches);
