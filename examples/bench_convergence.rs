//! Run with `cargo run --release --example bench_convergence -- --nats URL
//! --balancer http://127.0.0.1:18083/ --service conv` against a running
//! `rollcall discovery` and `rollcall balancer ... conv` (see
//! `bench/convergence.sh`).
//!
//! How fast a membership change reaches the balancer, measured from the
//! outside: this client runs its own backends, publishes their events like a
//! service would, and keeps requests flowing through the balancer while
//! every backend records when it was hit.
//!
//! - register → the first request that reaches the new instance;
//! - deregister → the last request that reaches it;
//! - crash (heartbeats stop, the process still answers) → the last request
//!   that reaches it, minus its deadline (last heartbeat + TTL);
//! - kill (heartbeats stop and the port closes) → client requests that
//!   failed meanwhile (the balancer should retry them elsewhere).
//!
//! Prints one `CONVERGENCE` line per figure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rollcall::protocol::{EventKind, Instance, Subjects};

#[path = "bench_support/mod.rs"]
mod bench_support;
use bench_support::{now_ns, publish, summary_ms, until, Backend};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "http://127.0.0.1:18083/")]
    balancer: String,
    #[arg(long, default_value = "conv")]
    service: String,
    /// Register/deregister trials.
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Crash trials (heartbeats stop, the backend keeps answering).
    #[arg(long, default_value_t = 100)]
    crash_trials: usize,
    /// Kill trials (heartbeats stop and the backend's port closes).
    #[arg(long, default_value_t = 20)]
    kill_trials: usize,
    /// TTL of the instances of crash and kill trials.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    ttl: Duration,
    /// Concurrent request loops through the balancer.
    #[arg(long, default_value_t = 2)]
    probers: usize,
}

#[derive(Default)]
struct Probe {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

async fn probe_loop(url: hyper::Uri, probe: Arc<Probe>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    while !probe.stop.load(Ordering::Relaxed) {
        let ok = match client.get(url.clone()).await {
            Ok(response) => {
                let status = response.status();
                response.into_body().collect().await.is_ok() && status.is_success()
            }
            Err(_) => false,
        };
        let counter = if ok { &probe.ok } else { &probe.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if !ok {
            // A 503 while the service is briefly empty should not spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn instance(service: &str, id: String, backend: &Backend, ttl: Duration) -> Instance {
    let mut instance = Instance::new(
        service,
        id,
        backend.addr.ip().to_string(),
        backend.addr.port(),
    );
    instance.ttl_ms = ttl.as_millis() as u64;
    instance
}

/// Waits until `backend` saw no request for `quiet` (at most `limit`).
async fn until_quiet(backend: &Backend, quiet: Duration, limit: Duration) -> bool {
    let quiet_ns = quiet.as_nanos() as u64;
    until(limit, || {
        let last = backend.last_hit.load(Ordering::Relaxed);
        now_ns().saturating_sub(last) >= quiet_ns
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    let subjects = Subjects::default();
    let url: hyper::Uri = args.balancer.parse().context("--balancer")?;

    // One instance that never leaves, so the service is never empty.
    let anchor = Backend::start("anchor").await?;
    let anchor_instance = instance(
        &args.service,
        "anchor".into(),
        &anchor,
        Duration::from_secs(600),
    );
    publish(&nats, &subjects, EventKind::Register, &anchor_instance).await?;
    nats.flush().await?;

    let probe = Arc::new(Probe::default());
    let probers: Vec<_> = (0..args.probers)
        .map(|_| tokio::spawn(probe_loop(url.clone(), Arc::clone(&probe))))
        .collect();
    if !until(Duration::from_secs(10), || {
        anchor.hits.load(Ordering::Relaxed) > 0
    })
    .await
    {
        anyhow::bail!("no request reached the anchor backend through {url} within 10 s");
    }
    let anchor_refresh = {
        let (nats, subjects, anchor_instance) =
            (nats.clone(), subjects.clone(), anchor_instance.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = publish(&nats, &subjects, EventKind::Heartbeat, &anchor_instance).await;
            }
        })
    };

    // Register → first routed, deregister → last routed.
    let newcomer = Backend::start("newcomer").await?;
    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    let (mut join_timeouts, mut leave_timeouts) = (0, 0);
    let failed_before = probe.failed.load(Ordering::Relaxed);
    for trial in 0..args.trials {
        let i = instance(
            &args.service,
            format!("new-{trial}"),
            &newcomer,
            Duration::from_secs(600),
        );
        newcomer.reset();
        let t0 = now_ns();
        publish(&nats, &subjects, EventKind::Register, &i).await?;
        nats.flush().await?;
        if until(Duration::from_secs(2), || {
            newcomer.first_hit.load(Ordering::Relaxed) != u64::MAX
        })
        .await
        {
            joins.push((newcomer.first_hit.load(Ordering::Relaxed) - t0) as i64);
        } else {
            join_timeouts += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t1 = now_ns();
        publish(&nats, &subjects, EventKind::Deregister, &i).await?;
        nats.flush().await?;
        if until_quiet(
            &newcomer,
            Duration::from_millis(100),
            Duration::from_secs(2),
        )
        .await
        {
            leaves.push(newcomer.last_hit.load(Ordering::Relaxed) as i64 - t1 as i64);
        } else {
            leave_timeouts += 1;
        }
    }
    let failed_join_leave = probe.failed.load(Ordering::Relaxed) - failed_before;
    println!(
        "CONVERGENCE figure=register_to_first_routed {} timeouts={join_timeouts}",
        summary_ms(&mut joins)
    );
    println!(
        "CONVERGENCE figure=deregister_to_last_routed {} timeouts={leave_timeouts} failed_requests={failed_join_leave}",
        summary_ms(&mut leaves)
    );

    // Crash: heartbeats stop, the backend still answers, so the last request
    // it gets shows when the balancer dropped it.
    let interval = args.ttl / 5;
    let mut overshoots = Vec::new();
    let mut crash_timeouts = 0;
    let failed_before = probe.failed.load(Ordering::Relaxed);
    for trial in 0..args.crash_trials {
        let i = instance(&args.service, format!("crash-{trial}"), &newcomer, args.ttl);
        newcomer.reset();
        publish(&nats, &subjects, EventKind::Register, &i).await?;
        nats.flush().await?;
        if !until(Duration::from_secs(2), || {
            newcomer.first_hit.load(Ordering::Relaxed) != u64::MAX
        })
        .await
        {
            crash_timeouts += 1;
            continue;
        }
        // A couple of heartbeats, the last one at a trial-dependent phase.
        let beats = 2 + trial % 3;
        let mut last_beat = now_ns();
        for _ in 0..beats {
            tokio::time::sleep(interval).await;
            last_beat = now_ns();
            publish(&nats, &subjects, EventKind::Heartbeat, &i).await?;
            nats.flush().await?;
        }
        let deadline = last_beat + args.ttl.as_nanos() as u64;
        // A negative result would mean the instance left before its TTL.
        if until_quiet(
            &newcomer,
            Duration::from_millis(150),
            args.ttl + Duration::from_secs(3),
        )
        .await
        {
            overshoots.push(newcomer.last_hit.load(Ordering::Relaxed) as i64 - deadline as i64);
        } else {
            crash_timeouts += 1;
        }
    }
    let failed_crash = probe.failed.load(Ordering::Relaxed) - failed_before;
    println!(
        "CONVERGENCE figure=crash_last_routed_minus_deadline ttl_ms={} {} timeouts={crash_timeouts} failed_requests={failed_crash}",
        args.ttl.as_millis(),
        summary_ms(&mut overshoots)
    );

    // Kill: heartbeats stop and the port closes; count what clients saw.
    let failed_before = probe.failed.load(Ordering::Relaxed);
    let ok_before = probe.ok.load(Ordering::Relaxed);
    let mut kill_timeouts = 0;
    for trial in 0..args.kill_trials {
        let victim = Backend::start("victim").await?;
        let i = instance(&args.service, format!("kill-{trial}"), &victim, args.ttl);
        publish(&nats, &subjects, EventKind::Register, &i).await?;
        nats.flush().await?;
        if !until(Duration::from_secs(2), || {
            victim.first_hit.load(Ordering::Relaxed) != u64::MAX
        })
        .await
        {
            kill_timeouts += 1;
        }
        tokio::time::sleep(interval).await;
        publish(&nats, &subjects, EventKind::Heartbeat, &i).await?;
        nats.flush().await?;
        victim.kill();
        // Past the TTL plus a margin: the instance is out of the catalog.
        tokio::time::sleep(args.ttl + Duration::from_millis(100)).await;
    }
    let failed_kill = probe.failed.load(Ordering::Relaxed) - failed_before;
    let ok_kill = probe.ok.load(Ordering::Relaxed) - ok_before;
    println!(
        "CONVERGENCE figure=kill_failed_requests ttl_ms={} trials={} requests={} failed_requests={failed_kill} timeouts={kill_timeouts}",
        args.ttl.as_millis(),
        args.kill_trials,
        ok_kill + failed_kill
    );

    probe.stop.store(true, Ordering::Relaxed);
    for p in probers {
        let _ = p.await;
    }
    anchor_refresh.abort();
    publish(&nats, &subjects, EventKind::Deregister, &anchor_instance).await?;
    nats.flush().await?;
    Ok(())
}
