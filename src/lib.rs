//! rollcall: reactive service discovery and round-robin load balancing over
//! NATS.
//!
//! # Layout
//!
//! The modules follow the data, from a service's announcement to a client's
//! request reaching it:
//!
//! - [`protocol`]: the wire (events version 1, catalog version 2): Instance,
//!   Snapshot and Leadership records, the
//!   subjects, and the name and field rules (`docs/protocol.md`).
//! - [`catalog`]: the pure fold: events and time in, the live catalog and its
//!   changes out.
//! - [`discovery`]: NATS events through the fold (every replica; one leads,
//!   fenced by the catalog stream); a snapshot per change,
//!   published and kept in the catalog stream.
//! - [`catalog_stream`]: the JetStream last-value stream of snapshots.
//! - [`subscription`]: catalog messages from NATS into a stream of updates,
//!   the only input of a balancer.
//! - [`connect`]: how every component reaches NATS (credentials, TLS,
//!   reconnects, the [`Link`](connect::Link) state every component watches).
//! - [`balancer`]: the HTTP reverse proxy: catalog updates in, each request
//!   sent round-robin to a live instance of its route's service.
//! - [`announcer`]: a Rust service registers, heartbeats and deregisters
//!   itself.
//! - [`agent`]: announces a service in any language, gated by its HTTP
//!   health check.
//! - [`fleet_view`]: events, snapshots and the stored catalog as lines and
//!   JSON for people (`rollcall watch`, `rollcall catalog`).
//! - [`permissions`]: what NATS lets each role do; refusals as typed errors.
//! - [`metrics`] and [`admin_http`]: every long-running component's
//!   Prometheus families and the admin endpoint that serves them.
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
pub mod permissions;
pub mod protocol;
pub mod subscription;
