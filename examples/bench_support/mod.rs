//! Pieces the bench clients share: publishing events the way a service
//! would, backends that record when requests reached them, and percentiles.
//! Included with `#[path = "bench_support/mod.rs"] mod bench_support;`.

#![allow(dead_code)] // each client uses a different part of it

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rollcall::protocol::{EventKind, Instance, Subjects};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Nanoseconds since the first call: one clock for every timestamp a
/// client compares.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub async fn publish(
    client: &async_nats::Client,
    subjects: &Subjects,
    kind: EventKind,
    instance: &Instance,
) -> anyhow::Result<()> {
    let subject = subjects.event(kind, &instance.service, &instance.id);
    let payload = match kind {
        EventKind::Deregister => Bytes::from_static(b"{}"),
        _ => Bytes::from(serde_json::to_vec(instance)?),
    };
    client
        .publish(subject.clone(), payload)
        .await
        .with_context(|| format!("publishing on {subject}"))?;
    Ok(())
}

/// A backend that answers 200 with its name and records when it was hit.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: AtomicU64,
    /// `now_ns()` of the first hit since the last reset; `u64::MAX` = none.
    pub first_hit: AtomicU64,
    pub last_hit: AtomicU64,
    tasks: std::sync::Mutex<Option<JoinSet<()>>>,
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Arc<Backend>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = Arc::new(Backend {
            addr: listener.local_addr()?,
            hits: AtomicU64::new(0),
            first_hit: AtomicU64::new(u64::MAX),
            last_hit: AtomicU64::new(0),
            tasks: std::sync::Mutex::new(None),
        });
        let body = Bytes::from(format!("{name}\n"));
        let mut tasks = JoinSet::new();
        let me = Arc::clone(&backend);
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            // The connections live in this task's JoinSet so that `kill`
            // (aborting this task) drops them with the listener.
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (me, body) = (Arc::clone(&me), body.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        me.record();
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *backend.tasks.lock().expect("not poisoned") = Some(tasks);
        Ok(backend)
    }

    fn record(&self) {
        let t = now_ns();
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.first_hit.fetch_min(t, Ordering::Relaxed);
        self.last_hit.fetch_max(t, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.hits.store(0, Ordering::Relaxed);
        self.first_hit.store(u64::MAX, Ordering::Relaxed);
        self.last_hit.store(0, Ordering::Relaxed);
    }

    /// Closes the listener and every open connection, like a crashed process.
    pub fn kill(&self) {
        self.tasks.lock().expect("not poisoned").take();
    }
}

/// Waits until `done()` holds, checking every 100 µs; false on timeout.
pub async fn until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    done()
}

/// `p50 p99 max` in milliseconds of samples in nanoseconds (signed: a
/// negative value means "before the reference").
pub fn summary_ms(samples: &mut [i64]) -> String {
    if samples.is_empty() {
        return "n=0".into();
    }
    samples.sort_unstable();
    let pick = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1e6
    };
    format!(
        "n={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} min_ms={:.3}",
        samples.len(),
        pick(0.50),
        pick(0.99),
        pick(1.0),
        samples[0] as f64 / 1e6
    )
}
