//! rollcall: reactive service discovery and round-robin load balancing over
//! NATS.
//!
//! # Layout
//!
//! The modules follow the data, from a service's announcement to a client's
//! request reaching it:
//!
//! - [`protocol`]: the wire (events version 1, catalog version 3): Instance,
//!   Record (one per instance in the catalog), Snapshot (a service's set, as
//!   readers assemble it), Leadership and operator Override records, the
//!   subjects, and the name and field rules (`docs/protocol.md`).
//! - [`catalog`]: the pure fold: events, operator overrides and time in, the
//!   live catalog and its changes out.
//! - [`discovery`]: NATS events and overrides through the fold (every
//!   replica; one leads, fenced by the catalog stream, and answers
//!   overrides); the record of each changed instance, written to the
//!   catalog stream, which republishes it.
//! - [`partition`]: the partitions a server mapping puts events in, and
//!   the ones a discovery process owns (`--partitions`).
//! - [`catalog_stream`]: the JetStream last-value stream of records, one per
//!   instance.
//! - [`subscription`]: catalog records from NATS assembled into per-service
//!   snapshots, a stream of updates, the only input of a balancer.
//! - [`connect`]: how every component reaches NATS (credentials, TLS,
//!   reconnects, the [`Link`](connect::Link) state every component watches).
//! - [`balancer`]: the HTTP reverse proxy: catalog updates in, each request
//!   sent round-robin to a live instance of its route's service.
//! - [`announcer`]: a Rust service registers, heartbeats and deregisters
//!   itself.
//! - [`agent`]: announces a service in any language, gated by its HTTP
//!   health check.
//! - [`fleet_view`]: events, catalog records and the stored catalog as lines and
//!   JSON for people (`rollcall watch`, `rollcall catalog`).
//! - [`permissions`]: what NATS lets each role do; refusals as typed errors.
//! - [`metrics`] and [`admin_http`]: every long-running component's
//!   Prometheus families and the admin endpoint that serves them.
//!
//! # The public surface
//!
//! What is public is what someone outside this crate builds on, and no more:
//!
//! - a Rust service embedding the [`Announcer`] (with [`NatsOptions`] to
//!   connect and [`Instance`] to describe itself) — see
//!   `examples/web_service.rs`;
//! - a program embedding a role the `rollcall` binary runs: discovery
//!   ([`discovery::spawn`]), a balancer ([`balancer::Balancer`], fed by
//!   [`subscription::follow`] or by any stream of
//!   [`Update`](subscription::Update)s), the [`agent`], the views of
//!   [`fleet_view`] — the binary itself is such a program, and uses only this
//!   surface;
//! - the wire contract in [`protocol`] (records, subjects, limits, the
//!   operator's [`Override`](protocol::Override) and its
//!   [`OverrideReply`](protocol::OverrideReply)) for tools that speak it, and the pure [`catalog`] fold and
//!   [`balancer::rotation`] sets, which benchmarks and tests drive directly.
//!
//! Everything else (the proxy's request path, upstream pools, the leader
//! election's wire, counters) is `pub(crate)`: free to change without
//! breaking anyone.
#![forbid(unsafe_code)]

pub mod admin_http;
pub mod agent;
pub mod announcer;
pub mod balancer;
pub mod catalog;
pub mod catalog_stream;
pub mod connect;
pub mod discovery;
pub mod fleet_view;
pub mod metrics;
pub mod partition;
pub mod permissions;
pub mod protocol;
pub mod subscription;

pub use announcer::{Announcement, Announcer};
pub use connect::{Connection, NatsOptions};
pub use protocol::{Instance, Snapshot, Subjects};

/// An error and its causes on one line, `: `-separated, each printed once:
/// errors here keep their cause as `source` and leave it out of their own
/// message (hyper's client error alone says only `client error (Connect)`;
/// its cause says `Connection refused`).
pub struct ErrorChain<'e>(pub &'e dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
