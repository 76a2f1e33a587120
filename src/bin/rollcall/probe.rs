//! `rollcall probe URL`: one HTTP GET, exit 0 on a 2xx. The health check of
//! containers that have no shell, curl or wget (the compose stack's images).

use std::time::Duration;

use rollcall::agent::{Check, Prober};

use crate::args::parse_duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// http://host[:port]/path to GET.
    #[arg(value_name = "URL")]
    pub url: String,
    /// Longest wait for the connection and the response head.
    #[arg(long, value_parser = parse_duration, default_value = "2s", value_name = "DUR")]
    pub timeout: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let check = Check {
        url: Check::parse_url(&args.url)?,
        timeout: args.timeout,
    };
    Prober::new(&check)
        .probe()
        .await
        .map_err(anyhow::Error::msg)
}
