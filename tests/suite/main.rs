//! The integration suite, one binary: every test here isolates itself (its
//! own database and queue names on the real Postgres and RabbitMQ), so they
//! run side by side. The fault suite, which stops and restarts services, is
//! its own binary (`tests/faults`).

// Tests unwrap what must work: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod api;
mod audit;
mod binary;
mod control;
mod events;
mod gate;
mod hardening;
#[path = "../harness/mod.rs"]
mod harness;
mod kubernetes;
mod lifecycle;
mod operability;
mod partitions;
mod permissions;
mod retention;
mod roles;
mod store;
mod tls;
mod traces;
mod trust;
