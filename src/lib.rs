//! rollcall: reactive service discovery and round-robin load balancing over
//! NATS.
//!
//! # Layout
//!
//! The modules follow the data, from a service's announcement to a client's
//! request reaching it:
//!
//! - [`protocol`]: the wire, version 1: Instance and Snapshot records, the
//!   subjects, and the name and field rules (`docs/protocol.md`).
//! - [`catalog`]: the pure fold: events and time in, the live catalog and its
//!   changes out.
//! - [`connect`]: how every component reaches NATS (credentials, TLS,
//!   reconnects, connection events).
//! - [`permissions`]: what NATS lets each role do; refusals as typed errors.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod connect;
pub mod permissions;
pub mod protocol;
