//! Run with `cargo run --release --example bench_discovery_load -- --nats URL
//! --discovery-pid PID --instances 10000 --rate 250000 --duration 10s`
//! against a running `rollcall discovery` (see `bench/discovery_scale.sh`).
//!
//! Simulates a fleet through a real nats-server: `--instances` instances over
//! `--services` services heartbeat at `--rate` heartbeats/s in total. While
//! they do, a probe instance joins or leaves every 100 ms and the time until
//! discovery's snapshot shows it is recorded (snapshot propagation). The
//! discovery process is watched through /proc: CPU over the load phase, and
//! RSS before the fleet joined and after (bytes per live instance).
//!
//! With `--raw`, measures plain NATS pub→sub of 200-byte messages instead
//! (the ceiling any NATS consumer on this machine works under).
//!
//! Prints one `DISCOVERY_SCALE` (or `NATS_RAW`) line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use rollcall::protocol::{EventKind, Instance, Subjects};

#[path = "bench_support/mod.rs"]
mod bench_support;
use bench_support::{now_ns, publish, summary_ms};

/// How long the whole fleet may take to appear in the catalog.
const JOIN_LIMIT: Duration = Duration::from_secs(150);

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long)]
    discovery_pid: Option<u32>,
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Heartbeats per second, all instances together.
    #[arg(long, default_value_t = 250_000)]
    rate: u64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Measure raw NATS pub→sub for `--duration` instead.
    #[arg(long)]
    raw: bool,
}

/// (utime + stime in clock ticks, VmRSS in bytes) of a process.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok((ticks, rss_kib * 1024))
}

/// Instances per service as the last snapshot of each said.
type Seen = Arc<Mutex<HashMap<String, Vec<String>>>>;

async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn raw(args: &Args) -> anyhow::Result<()> {
    let publisher = connect(&args.nats).await?;
    let subscriber = connect(&args.nats).await?;
    let mut sub = subscriber.subscribe("bench.raw").await?;
    subscriber.flush().await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let reader = tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            if message.payload.as_ref() == b"END" {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let payload = Bytes::from(vec![b'x'; 200]);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < args.duration {
        for _ in 0..1000 {
            publisher.publish("bench.raw", payload.clone()).await?;
        }
        sent += 1000;
    }
    publisher
        .publish("bench.raw", Bytes::from_static(b"END"))
        .await?;
    publisher.flush().await?;
    let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
    let elapsed = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    println!(
        "NATS_RAW size=200 pub_msgs_per_s={:.0} sub_msgs_per_s={:.0} lost={}",
        sent as f64 / elapsed,
        got as f64 / elapsed,
        sent - got
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.raw {
        return raw(&args).await;
    }
    let subjects = Subjects::default();
    let nats = connect(&args.nats).await?;
    // The probe and the catalog watch on a connection of their own: on the
    // load's, a probe would wait behind the heartbeats queued to be sent,
    // and the figure would be the load generator's backlog.
    let watch = connect(&args.nats).await?;

    // Everything discovery publishes, assembled into the last snapshot per
    // service.
    let seen: Seen = Arc::default();
    let snapshots_seen = Arc::new(AtomicU64::new(0));
    let mut catalog = watch.subscribe(subjects.catalog_wildcard()).await?;
    watch.flush().await?;
    let (seen_w, count_w, subjects_w) = (
        Arc::clone(&seen),
        Arc::clone(&snapshots_seen),
        subjects.clone(),
    );
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Vec<String>)>();
    tokio::spawn(async move {
        // Records assembled into snapshots, as a balancer does.
        let mut held = rollcall::subscription::Held::default();
        while let Some(message) = catalog.next().await {
            let Ok(record) = subjects_w.parse_record(&message.subject, &message.payload) else {
                continue;
            };
            let service = record.service.clone();
            if held.offer(record).is_err() {
                continue;
            }
            let Some(snapshot) = held.snapshot(&service) else {
                continue;
            };
            count_w.fetch_add(1, Ordering::Relaxed);
            let ids: Vec<String> = snapshot.instances.into_iter().map(|i| i.id).collect();
            if snapshot.service == "probe" {
                let _ = probe_tx.send((now_ns(), ids.clone()));
            }
            seen_w
                .lock()
                .expect("not poisoned")
                .insert(snapshot.service, ids);
        }
    });

    let (ticks0, rss0) = match args.discovery_pid {
        Some(pid) => proc_usage(pid)?,
        None => (0, 0),
    };
    let fleet: Vec<(String, Bytes)> = (0..args.instances)
        .map(|n| {
            let service = format!("load-{:04}", n % args.services);
            let mut i = Instance::new(
                service,
                format!("i-{n:06}"),
                "10.0.0.1",
                8080 + (n % 1000) as u16,
            );
            i.tags = vec!["v2".into()];
            i.meta.insert("zone".into(), "eu-west-1a".into());
            i.meta.insert("version".into(), "2.14.3-build.7".into());
            let subject = subjects.event(EventKind::Heartbeat, &i.service, &i.id);
            (
                subject,
                Bytes::from(serde_json::to_vec(&i).expect("serializes")),
            )
        })
        .collect();
    let payload_len = fleet.iter().map(|(_, p)| p.len()).sum::<usize>() / fleet.len().max(1);

    // Paced publishing: every millisecond, catch up with `rate`.
    let rate = args.rate;
    let publish_for = |duration: Duration, count: Option<usize>| {
        let (nats, fleet) = (nats.clone(), &fleet);
        async move {
            let start = Instant::now();
            let mut sent = 0u64;
            let mut next = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                if elapsed >= duration || count.is_some_and(|c| sent as usize >= c) {
                    break;
                }
                let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
                while sent < due && count.is_none_or(|c| (sent as usize) < c) {
                    let (subject, payload) = &fleet[next];
                    nats.publish(subject.clone(), payload.clone()).await?;
                    next = (next + 1) % fleet.len();
                    sent += 1;
                }
            }
            nats.flush().await?;
            anyhow::Ok((sent, start.elapsed()))
        }
    };

    // Join: every instance once, then wait until the snapshots list them all.
    let join_start = Instant::now();
    publish_for(Duration::from_secs(120), Some(args.instances)).await?;
    let live_load = |seen: &Seen| {
        seen.lock()
            .expect("not poisoned")
            .iter()
            .filter(|(s, _)| s.starts_with("load-"))
            .map(|(_, ids)| ids.len())
            .sum::<usize>()
    };
    let all_in = bench_support::until(JOIN_LIMIT, || live_load(&seen) == args.instances).await;
    let joined_in = join_start.elapsed();
    if !all_in {
        // Itself a figure: how far the catalog got.
        println!(
            "DISCOVERY_SCALE instances={} services={} rate_target={} join_incomplete_after_s={} live_seen={}",
            args.instances,
            args.services.min(args.instances),
            args.rate,
            JOIN_LIMIT.as_secs(),
            live_load(&seen)
        );
        return Ok(());
    }
    let rss_joined = match args.discovery_pid {
        Some(pid) => proc_usage(pid)?.1,
        None => 0,
    };

    // Load, with a probe joining or leaving every 100 ms.
    let snapshots_before = snapshots_seen.load(Ordering::Relaxed);
    let (ticks1, _) = match args.discovery_pid {
        Some(pid) => proc_usage(pid)?,
        None => (0, 0),
    };
    let probe_nats = watch.clone();
    let probe_subjects = subjects.clone();
    let probe_duration = args.duration;
    let prober = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut missed = 0;
        let start = Instant::now();
        let mut k = 0u64;
        while start.elapsed() + Duration::from_millis(200) < probe_duration {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = format!("probe-{}", k / 2);
            let joining = k % 2 == 0;
            k += 1;
            let i = Instance::new("probe", id.as_str(), "10.0.0.2", 80);
            let kind = if joining {
                EventKind::Register
            } else {
                EventKind::Deregister
            };
            let t0 = now_ns();
            publish(&probe_nats, &probe_subjects, kind, &i).await?;
            probe_nats.flush().await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                match tokio::time::timeout_at(deadline, probe_rx.recv()).await {
                    Ok(Some((at, ids))) if ids.contains(&id) == joining => {
                        samples.push((at - t0) as i64);
                        break;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => {
                        missed += 1;
                        break;
                    }
                }
            }
        }
        anyhow::Ok((samples, missed))
    });
    let (sent, took) = publish_for(args.duration, None).await?;
    let (mut samples, missed) = prober.await??;
    let (ticks2, rss_loaded) = match args.discovery_pid {
        Some(pid) => proc_usage(pid)?,
        None => (0, 0),
    };
    let probes = samples.len() as u64;
    // Heartbeats that change nothing publish nothing: any other snapshot in
    // the load phase means an instance expired, i.e. heartbeats were lost.
    let unexpected = snapshots_seen.load(Ordering::Relaxed) - snapshots_before - probes;
    let live = live_load(&seen);
    let cpu_pct = (ticks2 - ticks1) as f64 / took.as_secs_f64(); // 100 ticks/s
    println!(
        "DISCOVERY_SCALE instances={} services={} payload_bytes={payload_len} rate_target={} rate_sent={:.0} \
         discovery_cpu_pct={cpu_pct:.0} join_s={:.2} rss_before_mib={:.1} rss_joined_mib={:.1} rss_loaded_mib={:.1} \
         rss_per_instance_bytes={:.0} propagation_{} probe_missed={missed} unexpected_snapshots={unexpected} \
         live_after={live} join_cpu_ticks={}",
        args.instances,
        args.services.min(args.instances),
        args.rate,
        sent as f64 / took.as_secs_f64(),
        joined_in.as_secs_f64(),
        rss0 as f64 / 1048576.0,
        rss_joined as f64 / 1048576.0,
        rss_loaded as f64 / 1048576.0,
        (rss_loaded.max(rss_joined) as f64 - rss0 as f64) / args.instances as f64,
        summary_ms(&mut samples),
        ticks1 - ticks0,
    );
    Ok(())
}
