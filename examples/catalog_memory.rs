//! Run with `cargo run --release --example catalog_memory -- --instances 10000`
//!
//! Where discovery's memory per live instance goes, in process: a counting
//! allocator measures the heap the catalog fold holds for a fleet joined
//! through it, and the transient peak of taking every service's snapshot
//! (what a publish builds). Bytes are counted as requested and as glibc's
//! malloc hands them out (16-byte chunks, 8 bytes of header, 32 at least),
//! which is what RSS sees.
//!
//! Records are shaped like `bench_discovery_load`'s (one tag, two meta
//! pairs) by default, like the fold bench's with `--rich` (two tags, three
//! meta pairs). Prints one `CATALOG_MEMORY` line.
//!
//! With `--heartbeats R`, then folds R rounds of a repeated heartbeat from
//! every instance the way discovery does (digest the payload, move the
//! deadline) in `repeated_heartbeats`, and R rounds of parsed heartbeats
//! that change nothing (the fold bench's `heartbeat_noop`) in
//! `noop_heartbeats`, for instruction and cache-miss counts per heartbeat
//! under callgrind:
//! `valgrind --tool=callgrind --cache-sim=yes --collect-atstart=no
//! --toggle-collect='*_heartbeats*' target/release/examples/catalog_memory --heartbeats 5`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use clap::Parser;
use rollcall::catalog::{payload_digest, Catalog};
use rollcall::protocol::{Event, EventKind, Instance, Subjects};

/// The system allocator, counting what is live and the most that was.
struct Counting;

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);
static PEAK_CHUNKS: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// What glibc's malloc takes for a request of `size` bytes.
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

fn counted(size: usize) {
    REQUESTED.fetch_add(size, Ordering::Relaxed);
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let now = CHUNKS.fetch_add(chunk(size), Ordering::Relaxed) + chunk(size);
    PEAK_CHUNKS.fetch_max(now, Ordering::Relaxed);
}

fn released(size: usize) {
    REQUESTED.fetch_sub(size, Ordering::Relaxed);
    ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
    CHUNKS.fetch_sub(chunk(size), Ordering::Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; only counters are
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        released(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        released(layout.size());
        counted(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Two tags and three meta pairs per record instead of one and two.
    #[arg(long)]
    rich: bool,
    /// Rounds of repeated heartbeats from every instance after the join.
    #[arg(long, default_value_t = 0)]
    heartbeats: usize,
}

/// Folds heartbeats that change nothing; dropping each event is part of it,
/// as in discovery.
#[inline(never)]
fn noop_heartbeats(catalog: &mut Catalog, events: Vec<Event>, now: Instant) -> usize {
    events
        .into_iter()
        .map(|event| usize::from(catalog.apply(event, now).is_some()))
        .sum()
}

/// `rounds` repeated heartbeats of every `(subject, payload)`, the way
/// discovery folds one: split the subject, digest the payload, move the
/// deadline. Kept out of line so callgrind can count it alone.
#[inline(never)]
fn repeated_heartbeats(
    catalog: &mut Catalog,
    subjects: &Subjects,
    messages: &[(String, Vec<u8>)],
    rounds: usize,
) -> usize {
    let mut refreshed = 0;
    for round in 0..rounds {
        let now = Instant::now() + std::time::Duration::from_millis(round as u64);
        for (subject, payload) in messages {
            let Ok((_, service, id)) = subjects.parse_event_subject(subject) else {
                continue;
            };
            refreshed += usize::from(catalog.refresh(service, id, payload_digest(payload), now));
        }
    }
    refreshed
}

fn instance(n: usize, services: usize, rich: bool) -> Instance {
    let mut i = Instance::new(
        format!("load-{:04}", n % services),
        format!("i-{n:06}"),
        "10.0.0.1",
        8080 + (n % 1000) as u16,
    );
    i.tags = vec!["v2".into()];
    i.meta.insert("zone".into(), "eu-west-1a".into());
    i.meta.insert("version".into(), "2.14.3-build.7".into());
    if rich {
        i.tags.push("blue".into());
        i.meta.insert("team".into(), "checkout-web".into());
    }
    i
}

/// (requested bytes, malloc chunk bytes, allocations) live now.
fn live() -> (usize, usize, usize) {
    (
        REQUESTED.load(Ordering::Relaxed),
        CHUNKS.load(Ordering::Relaxed),
        ALLOCATIONS.load(Ordering::Relaxed),
    )
}

fn main() {
    let args = Args::parse();
    let n = args.instances.max(1);
    let now = Instant::now();
    let mut catalog = Catalog::new();
    let subjects = Subjects::default();
    let (req0, chunks0, allocs0) = live();
    for k in 0..n {
        let event = Event::Register(instance(k, args.services, args.rich));
        catalog.apply(event, now);
    }
    let (req1, chunks1, allocs1) = live();
    PEAK_CHUNKS.store(chunks1, Ordering::Relaxed);
    let snapshots = catalog.snapshots();
    let json: usize = snapshots
        .iter()
        .map(|s| serde_json::to_vec(s).map_or(0, |v| v.len()))
        .sum();
    drop(snapshots);
    let peak = PEAK_CHUNKS.load(Ordering::Relaxed) - chunks1;
    let per = |bytes: usize| bytes as f64 / n as f64;
    println!(
        "CATALOG_MEMORY instances={n} services={} rich={} requested_per_instance={:.0} \
         malloc_per_instance={:.0} allocations_per_instance={:.2} snapshots_peak_per_instance={:.0} \
         snapshot_json_per_instance={:.0}",
        args.services.min(n),
        args.rich,
        per(req1 - req0),
        per(chunks1 - chunks0),
        (allocs1 - allocs0) as f64 / n as f64,
        per(peak),
        per(json),
    );
    assert_eq!(catalog.live_instances(), n);
    if args.heartbeats > 0 {
        // Shuffled by a stride, as a fleet's heartbeats arrive interleaved.
        let stride = 7919;
        let messages: Vec<(String, Vec<u8>)> = (0..n)
            .map(|k| instance(k * stride % n, args.services, args.rich))
            .map(|i| {
                let subject = subjects.event(EventKind::Heartbeat, &i.service, &i.id);
                let payload = serde_json::to_vec(&i).unwrap_or_default();
                catalog.set_digest(&i.service, &i.id, payload_digest(&payload));
                (subject, payload)
            })
            .collect();
        let refreshed = repeated_heartbeats(&mut catalog, &subjects, &messages, args.heartbeats);
        let mut changed = 0;
        for round in 0..args.heartbeats {
            let events = (0..n)
                .map(|k| Event::Heartbeat(instance(k * stride % n, args.services, args.rich)))
                .collect();
            let at = now + std::time::Duration::from_millis(round as u64);
            changed += noop_heartbeats(&mut catalog, events, at);
        }
        println!(
            "HEARTBEATS rounds={} refreshed={refreshed} changed={changed}",
            args.heartbeats
        );
    }
}
