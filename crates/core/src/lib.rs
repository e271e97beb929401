//! # sendgate-core
//!
//! The pure core of sendgate: everything the gate *decides*, with no I/O.
//! It depends on no async runtime, broker client or database driver (its
//! `Cargo.toml` names none), so the compiler keeps it pure and every rule is
//! unit- and property-tested in place. The `sendgate` crate re-exports it as
//! `sendgate::domain`.
//!
//! - [`ids`]: `AccountId`, `IdempotencyKey` and `JobKey`, validated once.
//! - [`job`]: a send job's body and `message_id`, parsed (docs/contract.md#2-the-job-and-how-it-is-published).
//! - [`json`]: bodies read as JSON objects whose keys appear once.
//! - [`plan`]: plans, charges, refusal reasons, limits, and an account's
//!   calendar day in its time zone (docs/contract.md#1-plans).
//! - [`decision`]: a batch of jobs against its accounts' state: forward,
//!   dead-letter, defer or drop as a duplicate, and what to write (docs/contract.md#3-outcomes).
//! - [`settle`]: delivery reports against reservations: commit or release.
//! - [`events`]: the threshold events a change of credits, usage or plan makes.

#![forbid(unsafe_code)]

pub mod decision;
pub mod events;
pub mod ids;
pub mod job;
pub mod json;
pub mod plan;
pub mod settle;
