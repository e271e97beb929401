//! # sendgate
//!
//! The credit gate in front of voice-note delivery. A campaign scheduler
//! publishes send jobs to a RabbitMQ queue; sendgate charges each job to its
//! account's plan exactly once (in Postgres, under the job's idempotency
//! key), forwards the jobs that pass to the delivery queue, and dead-letters
//! the rest with a machine-readable reason. `docs/contract.md` states what it
//! promises; the code follows it.
//!
//! ## Layout: where a change goes
//!
//! - [`domain`] (the `sendgate-core` crate in `crates/core`) is the pure
//!   core: identifiers validated once, the job, the plans, the decision of a
//!   batch and the settling of delivery reports. It has no I/O: its
//!   `Cargo.toml` names no tokio, lapin or sqlx, so the compiler keeps it
//!   that way, and its rules are unit- and property-tested in place. A new
//!   product rule starts here.
//! - [`store`] owns every SQL statement: the hot decide path, settling,
//!   marks, accounts; rows decode in one place, the long statements sit
//!   next to their reasoning, and [`store::StoreError`] says whether a
//!   retry can help.
//! - [`amqp`] owns everything that speaks AMQP: the topology, the messages
//!   that carry each outcome, the shared connection and a worker's session,
//!   publishing with confirms and acking; plus queue depths and redrive.
//! - [`worker`] runs the consume loops on top of those: the jobs pipeline
//!   (batch, decide, publish, mark, ack), the outcomes worker, the hold
//!   sweep, and each decided job's log line and metrics as one event.
//! - [`http`] serves `/metrics`, `/healthz`, `/readyz` and the `/v1` API;
//!   [`health`] is the readiness the workers report.
//! - [`app`] wires it all together for `sendgate run` and drains on
//!   shutdown; [`shutdown`] turns signals into that.
//! - [`retry`] is the one place that knows `backoff`; [`metrics`] owns every
//!   metric name (and `docs/metrics.md`); [`config`] the layered settings;
//!   [`telemetry`] logging; [`clock`] the source of "now", replaceable in
//!   tests.
//!
//! The layers only point down: `domain` depends on nothing here; `store`
//! and `amqp` on `domain` and `config`; `worker` on those; `http` and `app`
//! on top.

#![forbid(unsafe_code)]

pub use sendgate_core as domain;

pub mod amqp;
pub mod app;
pub mod clock;
pub mod config;
#[cfg(test)]
mod contract;
pub mod ctl;
pub mod endpoints;
pub mod health;
pub mod http;
pub mod metrics;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod worker;
