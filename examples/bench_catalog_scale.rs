//! Run with `cargo run --release --example bench_catalog_scale -- --nats URL
//! --balancer 127.0.0.1:PORT --admin 127.0.0.1:PORT --instances 10000
//! [--rolling]` against a running `rollcall discovery` and `rollcall
//! balancer ... web` (see `bench/catalog_scale.sh`).
//!
//! Registers `--instances` instances of one service, `web`, on a few real
//! backends started here (they share ports), and measures: the time until
//! the balancer's `/catalog` lists them all; requests served through the
//! balancer and their p99; the p99 of reading `/catalog` then; and the bytes on the wire for one instance's change (subject,
//! headers and payload of every message on `<prefix>.catalog.>` and
//! `<prefix>.catalog-store.>` it caused). With `--rolling`, then restarts
//! every instance in waves of 10% (each deregisters and registers again on
//! another port) while requests run, and measures the catalog bytes, the
//! time until the balancer shows the final set, and failed requests.
//!
//! Prints one `CATALOG_SCALE` line (and one `ROLLING_RESTART` line).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use rollcall::protocol::{EventKind, Instance, Subjects};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "bench_support/mod.rs"]
mod bench_support;
use bench_support::{publish, Backend};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The balancer's proxy address.
    #[arg(long)]
    balancer: String,
    /// The balancer's admin address (`/catalog`).
    #[arg(long)]
    admin: String,
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Registers per second: discovery's event subscription is not flooded.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Restart every instance in waves of 10% afterwards.
    #[arg(long)]
    rolling: bool,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "600s")]
    limit: Duration,
}

/// Real backends the instances share: the first half before a restart, the
/// second after.
const BACKENDS: usize = 8;

fn instance(n: usize, port: u16) -> Instance {
    let mut i = Instance::new("web", format!("web-{n:06}"), "127.0.0.1", port);
    // No heartbeats needed while the benchmark runs.
    i.ttl_ms = 600_000;
    i
}

/// One HTTP/1.1 GET on a fresh connection: the status, or `None`.
async fn get(addr: &str, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let head = std::str::from_utf8(answer.get(..12)?).ok()?;
    head.get(9..12)?.parse().ok()
}

/// `/catalog`'s `web` instances as (id, address).
async fn listed(admin: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(b"GET /catalog HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").context("an HTTP answer")?.1;
    // Chunked or not, the JSON object is between the first `{` and last `}`.
    let json = &body[body.find('{').context("JSON")?..=body.rfind('}').context("JSON")?];
    let catalog: serde_json::Value = serde_json::from_str(json)?;
    let instances = catalog["services"][0]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(instances
        .iter()
        .map(|i| {
            let field = |k: &str| i[k].as_str().unwrap_or_default().to_owned();
            (field("id"), field("address"))
        })
        .collect())
}

/// Waits until `/catalog` satisfies `done`; the time it took.
async fn until_listed(
    args: &Args,
    done: impl Fn(&[(String, String)]) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < args.limit {
        let asked = Instant::now();
        if listed(&args.admin).await.is_ok_and(|l| done(&l)) {
            return Ok(start.elapsed());
        }
        // `/catalog` of a big service is costly to render: polling must not
        // take the balancer's time from the catalog it is applying.
        let took = asked.elapsed();
        tokio::time::sleep((took * 4).max(Duration::from_millis(100))).await;
    }
    anyhow::bail!("the balancer never showed the set within {:?}", args.limit)
}

/// `/catalog` reads timed once every instance is listed.
const CATALOG_READS: usize = 20;

/// The 99th percentile of `samples` (nearest rank).
fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    let rank = (samples.len() * 99).div_ceil(100).max(1);
    samples.get(rank - 1).copied().unwrap_or_default()
}

/// Publishes `events` at `rate` per second.
async fn paced(
    nats: &async_nats::Client,
    rate: u64,
    events: impl Iterator<Item = (EventKind, Instance)>,
) -> anyhow::Result<()> {
    let subjects = Subjects::default();
    let start = Instant::now();
    for (sent, (kind, instance)) in events.enumerate() {
        publish(nats, &subjects, kind, &instance).await?;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            if wait > Duration::from_millis(2) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    nats.flush().await?;
    Ok(())
}

/// Counts the bytes (subject, headers, payload) and messages on the
/// catalog subjects until dropped.
struct WireCount {
    bytes: Arc<AtomicU64>,
    messages: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WireCount {
    async fn start(nats: &async_nats::Client) -> anyhow::Result<WireCount> {
        let live = nats.subscribe("rollcall.catalog.>").await?;
        let stored = nats.subscribe("rollcall.catalog-store.>").await?;
        nats.flush().await?;
        let (bytes, messages) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (b, m) = (Arc::clone(&bytes), Arc::clone(&messages));
        let task = tokio::spawn(async move {
            let mut all = futures::stream::select(live, stored);
            while let Some(message) = all.next().await {
                let headers: usize = message
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .map(|(name, values)| {
                        let name = name.to_string().len();
                        // `Name: value\r\n`
                        (values.iter())
                            .map(|v| name + v.as_str().len() + 4)
                            .sum::<usize>()
                    })
                    .sum();
                let size = message.subject.len() + headers + message.payload.len();
                b.fetch_add(size as u64, Ordering::Relaxed);
                m.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(WireCount {
            bytes,
            messages,
            task,
        })
    }

    fn read(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed),
        )
    }
}

impl Drop for WireCount {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = async_nats::connect(&args.nats).await?;
    let mut backends = Vec::new();
    for n in 0..BACKENDS {
        backends.push(Backend::start(&format!("b-{n}")).await?);
    }
    let port = |n: usize, after: bool| {
        let half = BACKENDS / 2;
        backends[n % half + if after { half } else { 0 }]
            .addr
            .port()
    };
    let n = args.instances;

    let fleet = (0..n).map(|i| (EventKind::Register, instance(i, port(i, false))));
    let start = Instant::now();
    paced(&nats, args.rate, fleet).await?;
    until_listed(&args, |l| l.len() == n).await?;
    let joined = start.elapsed();

    let mut served = 0;
    let mut took = Vec::with_capacity(100);
    for _ in 0..100 {
        let asked = Instant::now();
        served += u32::from(get(&args.balancer, "/").await == Some(200));
        took.push(asked.elapsed());
    }
    let request_p99 = p99(&mut took);
    let mut took = Vec::with_capacity(CATALOG_READS);
    for _ in 0..CATALOG_READS {
        let asked = Instant::now();
        let listed = listed(&args.admin).await?.len();
        took.push(asked.elapsed());
        anyhow::ensure!(listed == n, "/catalog lists {listed} of {n}");
    }
    let catalog_p99 = p99(&mut took);

    let count = WireCount::start(&nats).await?;
    let one = instance(n / 2, port(n / 2, false));
    publish(&nats, &Subjects::default(), EventKind::Deregister, &one).await?;
    until_listed(&args, |l| l.len() == n - 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (bytes, messages) = count.read();
    drop(count);
    println!(
        "CATALOG_SCALE instances={n} join_s={:.2} requests=100 served={served} request_p99_ms={:.1} catalog_reads={CATALOG_READS} catalog_p99_ms={:.1} change_bytes={bytes} change_messages={messages}",
        joined.as_secs_f64(),
        request_p99.as_secs_f64() * 1000.0,
        catalog_p99.as_secs_f64() * 1000.0,
    );
    publish(&nats, &Subjects::default(), EventKind::Register, &one).await?;
    until_listed(&args, |l| l.len() == n).await?;

    if args.rolling {
        rolling(&args, &nats, n, &port).await?;
    }
    Ok(())
}

/// Restarts every instance in waves of 10% under a steady request load.
async fn rolling(
    args: &Args,
    nats: &async_nats::Client,
    n: usize,
    port: &impl Fn(usize, bool) -> u16,
) -> anyhow::Result<()> {
    let count = WireCount::start(nats).await?;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (ok, failed, stop, addr) = (
            ok.clone(),
            failed.clone(),
            stop.clone(),
            args.balancer.clone(),
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                match get(&addr, "/").await {
                    Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let start = Instant::now();
    let wave = n.div_ceil(10);
    for first in (0..n).step_by(wave) {
        let ids = first..(first + wave).min(n);
        let leaving = ids
            .clone()
            .map(|i| (EventKind::Deregister, instance(i, port(i, false))));
        paced(nats, args.rate, leaving).await?;
        let back = ids.map(|i| (EventKind::Register, instance(i, port(i, true))));
        paced(nats, args.rate, back).await?;
    }
    let after: std::collections::HashSet<String> = (0..n)
        .map(|i| format!("127.0.0.1:{}", port(i, true)))
        .collect();
    until_listed(args, |l| {
        l.len() == n && l.iter().all(|(_, a)| after.contains(a))
    })
    .await?;
    let wall = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    load.await?;
    let (bytes, messages) = count.read();
    println!(
        "ROLLING_RESTART instances={n} waves=10 wall_s={:.2} catalog_bytes={bytes} catalog_messages={messages} requests={} failed_requests={}",
        wall.as_secs_f64(),
        ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}
