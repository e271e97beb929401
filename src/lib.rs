//! # sendgate
//!
//! The credit gate in front of voice-note delivery. A campaign scheduler
//! publishes send jobs to a RabbitMQ queue; sendgate charges each job to its
//! account's plan exactly once (in Postgres, under the job's idempotency
//! key), forwards the jobs that pass to the delivery queue, and dead-letters
//! the rest with a machine-readable reason. `../shared/SPEC.md` (shipped as
//! the README's contract) is the source of truth.
//!
//! ## Layout
//!
//! - [`job`] parses and validates a job's body and `message_id`. Pure.
//! - [`plan`] is the product vocabulary: plans, charges, refusal reasons, and
//!   an account's calendar day in its time zone. Pure.
//! - [`decision`] decides a whole batch of jobs against the state of their
//!   accounts and says what to write. Pure, so it is unit- and
//!   property-tested without a database.
//! - [`settle`] settles reservations with delivery outcomes (commit or
//!   release). Pure.
//! - [`store`] owns every SQL statement: accounts, the append-only credit
//!   ledger, reservations and Pro usage. A batch is decided in one
//!   transaction that locks its free and pro accounts in id order; a batch
//!   of scale accounts only (nothing to protect) takes one read and one
//!   atomic insert, without a transaction.
//! - [`amqp`] owns the broker topology and the shape of outcome messages.
//! - [`gate`] is the worker loop: gather jobs into batches (one transaction
//!   at a time while the gate keeps up, more when jobs back up), decide,
//!   publish with publisher confirms, ack only what the broker confirmed;
//!   reconnect with backoff when the broker goes away.
//! - [`app`] wires it together for `sendgate run` and drains on shutdown;
//!   [`http`] serves `/metrics`, `/healthz`, `/readyz`; [`api`] the
//!   account API; [`health`] holds the
//!   readiness the workers report.
//! - [`depth`] polls queue depths for the metrics;
//! - [`redrive`] lists dead letters and moves chosen ones back;
//! - [`metrics`] owns every metric name (and `docs/metrics.md`); [`config`] the layered settings;
//!   [`telemetry`] logging; [`shutdown`] signals; [`clock`] the source of
//!   "now", replaceable in tests.

#![forbid(unsafe_code)]

pub mod amqp;
pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod decision;
pub mod depth;
pub mod gate;
pub mod health;
pub mod http;
pub mod job;
pub mod metrics;
pub mod plan;
pub mod redrive;
pub mod settle;
pub mod shutdown;
pub mod store;
pub mod telemetry;
