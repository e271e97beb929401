//! RabbitMQ: everything that speaks AMQP.
//!
//! - [`topology`]: the exchange and queues of docs/contract.md#6-queues-and-exchanges, declared idempotently;
//! - [`message`]: the messages that carry each outcome, and their headers;
//! - [`session`]: the process's shared connection, and a worker's channels
//!   and consumers on it;
//! - [`confirm`]: publishing with publisher confirms, and acking a batch;
//! - [`depth`]: queue depths for the metrics;
//! - [`redrive`]: listing dead letters and moving chosen ones back.
//!
//! The consume loops that use these are in [`crate::worker`].

pub mod confirm;
pub mod depth;
pub mod message;
pub mod redrive;
pub mod session;
pub mod topology;
pub mod trace;

use std::str::FromStr;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, LongString};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use tracing::{info, warn};

pub use message::{Outgoing, header_text};
pub use topology::declare_topology;

use crate::config::AmqpSettings;

pub const HEADER_DECISION: &str = "x-sendgate-decision";
pub const HEADER_PLAN: &str = "x-sendgate-plan";
pub const HEADER_CHARGE: &str = "x-sendgate-charge";
pub const HEADER_RESERVATION_ID: &str = "x-sendgate-reservation-id";
pub const HEADER_CREDITS_REMAINING: &str = "x-sendgate-credits-remaining";
pub const HEADER_DAILY_REMAINING: &str = "x-sendgate-daily-remaining";
pub const HEADER_REASON: &str = "x-sendgate-reason";
pub const HEADER_DETAIL: &str = "x-sendgate-detail";
pub const HEADER_RETRY_AFTER: &str = "x-sendgate-retry-after";
/// On a deferred job in the deferral ladder: when it may be gated again
/// (RFC 3339, milliseconds). Until then it only takes the next step.
pub const HEADER_DEFERRED_UNTIL: &str = "x-sendgate-deferred-until";
/// On a dead letter: when sendgate refused it (RFC 3339, milliseconds).
pub const HEADER_DECIDED_AT: &str = "x-sendgate-decided-at";
/// Which queue a held job (waiting, or deferred) goes to through the hold
/// exchange. Not `x-` like the others: a headers exchange ignores headers
/// whose names begin with `x-` when it matches.
pub const HEADER_HOLD: &str = "sendgate-hold";
/// On a dead letter: what was refused, `job` or `report`. Redrive moves
/// only jobs.
pub const HEADER_SOURCE: &str = "x-sendgate-source";
/// Routing key of jobs the broker itself dead-letters from the send queue
/// (its delivery limit, or a reject without requeue).
pub const BROKER_DEAD_LETTER_KEY: &str = "delivery_limit";

/// Opens a connection to the first node of `amqp.url` that accepts one,
/// named `name` in the management UI.
///
/// # Errors
/// Every node is unreachable or refuses the login (the last node's error).
pub async fn connect(settings: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    connect_from(settings, name, 0)
        .await
        .map(|(connection, _)| connection)
}

/// Tries each node of `amqp.url` once, in order from node `first` (wrapping
/// around), and returns the first connection opened with the index of its
/// node. Each attempt is logged with its node and counted; a caller backs
/// off only when this fails, that is once every node has.
///
/// # Errors
/// Every node is unreachable or refuses the login (the last node's error).
pub async fn connect_from(
    settings: &AmqpSettings,
    name: &str,
    first: usize,
) -> lapin::Result<(Connection, usize)> {
    let nodes = crate::endpoints::amqp_nodes(settings.url.expose());
    let mut last_error = None;
    for offset in 0..nodes.len() {
        let index = (first + offset) % nodes.len();
        let node = crate::endpoints::node_label(nodes[index]);
        match connect_node(settings, nodes[index], name).await {
            Ok(connection) => {
                crate::metrics::amqp_connect(&node, true);
                if nodes.len() > 1 {
                    info!(%node, connection = name, "connected to broker node");
                }
                return Ok((connection, index));
            }
            Err(err) => {
                crate::metrics::amqp_connect(&node, false);
                if nodes.len() > 1 {
                    warn!(%node, connection = name, error = %err, "broker node unreachable; trying the next");
                }
                last_error = Some(err);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "amqp.url names no node").into()
    }))
}

/// Opens a connection to one node with the configured heartbeat.
async fn connect_node(
    settings: &AmqpSettings,
    node: &str,
    name: &str,
) -> lapin::Result<Connection> {
    let mut uri = AMQPUri::from_str(node).map_err(|err| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("amqp.url: {err}"))
    })?;
    uri.query.heartbeat = Some(settings.heartbeat_secs);
    uri.query.connection_timeout.get_or_insert(10_000);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    if settings.ca_file.is_empty() {
        return Connection::connect_uri(uri, properties).await;
    }
    // Checked readable at start-up; read again here, so a renewed CA file
    // is used by the next connection.
    let ca = std::fs::read_to_string(&settings.ca_file).map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("amqp.ca_file {}: {err}", settings.ca_file),
        )
    })?;
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(ca),
    };
    Connection::connect_uri_with_config(uri, properties, tls, lapin::runtime::default_runtime()?)
        .await
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
