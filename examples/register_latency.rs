//! Run with `cargo run --release --example register_latency -- [NATS_URL] [N]`
//! against a running `nats-server -js` and `rollcall discovery`.
//!
//! Measures register → record: the time from publishing a register for a
//! new instance to receiving the catalog record that lists it, N times
//! (default 200), and prints p50/p99/max. Each instance deregisters after, so
//! the service stays small.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use rollcall::protocol::{EventKind, Instance, Subjects};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let n: usize = match args.next() {
        Some(n) => n.parse().context("N must be a whole number")?,
        None => 200,
    };
    let subjects = Subjects::default();
    let client = async_nats::connect(&url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    let mut catalog = client
        .subscribe(subjects.service_catalog("latency"))
        .await?;
    client.flush().await?;

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let instance = Instance::new("latency", format!("i{i}"), "127.0.0.1", 10_000);
        let payload = serde_json::to_vec(&instance)?;
        let sent = Instant::now();
        client
            .publish(
                subjects.event(EventKind::Register, "latency", &instance.id),
                payload.into(),
            )
            .await?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), catalog.next())
                .await
                .context("no record within 5 s: is `rollcall discovery` running?")?
                .context("subscription closed")?;
            let record = subjects.parse_record(&message.subject, &message.payload)?;
            if record.instance().is_some_and(|i| i.id == instance.id) {
                samples.push(sent.elapsed());
                break;
            }
        }
        client
            .publish(
                subjects.event(EventKind::Deregister, "latency", &instance.id),
                "{}".into(),
            )
            .await?;
    }
    if samples.is_empty() {
        bail!("no samples");
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "register_to_snapshot n={} p50_us={} p99_us={} max_us={}",
        samples.len(),
        at(0.50).as_micros(),
        at(0.99).as_micros(),
        samples[samples.len() - 1].as_micros()
    );
    Ok(())
}
