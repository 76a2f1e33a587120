//! `rollcall discovery`: the catalog fold as a process.

use anyhow::Context;

use crate::args::{shutdown_signal, NatsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let connection = args.nats.options().connect("rollcall-discovery").await?;
    let discovery = rollcall::discovery::spawn(
        connection.client.clone(),
        args.nats.prefix.clone(),
        shutdown_signal(),
    )
    .await
    .context("discovery could not start")?;
    discovery.wait().await.context("discovery stopped")?;
    Ok(())
}
