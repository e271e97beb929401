//! The topology of docs/contract.md#6-queues-and-exchanges. Declaring it again after a broker restart or a
//! deleted queue brings it back; declaring what exists changes nothing.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::{BROKER_DEAD_LETTER_KEY, long_string};
use crate::config::AmqpSettings;

/// Declares the exchange and queues sendgate uses, idempotently.
///
/// # Errors
/// The channel failed, or an existing queue has other arguments (the broker
/// then closes the channel with PRECONDITION_FAILED).
pub async fn declare_topology(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    // Dead letters: a topic exchange (routing key = reason) and its queue.
    declare_quorum(channel, &settings.dead_letter_queue, quorum_arguments()).await?;
    declare_exchange(
        channel,
        &settings.dead_letter_exchange,
        ExchangeKind::Topic,
        Some((&settings.dead_letter_queue, "#")),
    )
    .await?;
    declare_quorum(channel, &settings.delivery_queue, quorum_arguments()).await?;
    declare_quorum(
        channel,
        &settings.outcomes_queue,
        limited_arguments(settings),
    )
    .await?;
    declare_quorum(channel, &settings.send_queue, limited_arguments(settings)).await?;
    declare_partitions(channel, settings).await?;
    // Where earlier versions deferred jobs (per-message TTL): still
    // declared, so what waits there returns as before.
    declare_quorum(
        channel,
        &settings.deferred_queue,
        returning_arguments(settings),
    )
    .await?;
    for (wait, queue) in settings.deferral_steps() {
        let mut arguments = returning_arguments(settings);
        let ttl = i64::try_from(wait.as_millis()).expect("a step is at most a day");
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        declare_quorum(channel, &queue, arguments).await?;
    }
    declare_quorum(channel, &settings.wait_queue, returning_arguments(settings)).await?;
    declare_holds(channel, settings).await?;
    // Threshold events: a topic exchange (routing key = type) and, unless
    // `events_queue` is empty, a queue keeping them for the product.
    let events_queue = Some(settings.events_queue.as_str()).filter(|q| !q.is_empty());
    if let Some(queue) = events_queue {
        declare_quorum(channel, queue, quorum_arguments()).await?;
    }
    declare_exchange(
        channel,
        &settings.events_exchange,
        ExchangeKind::Topic,
        events_queue.map(|q| (q, "#")),
    )
    .await?;
    declare_jobs_entrance(channel, settings).await?;
    declare_entrance(
        channel,
        &settings.reports_exchange,
        &settings.outcomes_queue,
    )
    .await?;
    Ok(())
}

/// The name of RabbitMQ's consistent-hash exchange type, and the plugin
/// that provides it.
pub const CONSISTENT_HASH: &str = "x-consistent-hash";
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// The partitions and the consistent-hash exchange that spreads accounts
/// over them, each bound with the same weight, in partition order.
async fn declare_partitions(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let exchange = settings.partitions_exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for queue in settings.partition_queues() {
        let mut arguments = limited_arguments(settings);
        // Leaders spread over a cluster's nodes, so the partitions' work is.
        arguments.insert("x-queue-leader-locator".into(), long_string("balanced"));
        declare_quorum(channel, &queue, arguments).await?;
        // The binding key of a consistent-hash exchange is the queue's weight.
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// The ladder and the wait queue that return jobs to their partitions,
/// each bound to the hold exchange by its name in `sendgate-hold` (not `x-`: a headers exchange ignores those).
async fn declare_holds(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let exchange = settings.hold_exchange();
    declare_exchange(channel, &exchange, ExchangeKind::Headers, None).await?;
    let mut holds: Vec<(String, FieldTable)> = settings
        .partition_ladder()
        .into_iter()
        .map(|(wait, queue)| {
            let mut arguments = to_partition_arguments(settings);
            let ttl = i64::try_from(wait.as_millis()).expect("a step is at most a day");
            arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            (queue, arguments)
        })
        .collect();
    holds.push((
        settings.partition_wait_queue(),
        to_partition_arguments(settings),
    ));
    for (queue, arguments) in holds {
        declare_quorum(channel, &queue, arguments).await?;
        let mut matching = FieldTable::default();
        matching
            .insert("x-match".into(), long_string("all"))
            .insert(super::HEADER_HOLD.into(), long_string(&queue));
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                matching,
            )
            .await?;
    }
    Ok(())
}

/// The jobs entrance: a fanout exchange (what a scheduler's broker user is
/// allowed to publish to) bound to the partitions' exchange, which hashes
/// the routing key it keeps. Versions before partitions bound the fanout
/// to the send queue: that binding is removed after the new one exists, so
/// no job published meanwhile is lost (one published in between may reach
/// both, and is charged once, like any copy).
async fn declare_jobs_entrance(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    declare_exchange(channel, &settings.jobs_exchange, ExchangeKind::Fanout, None).await?;
    channel
        .exchange_bind(
            settings.partitions_exchange().as_str().into(),
            settings.jobs_exchange.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_unbind(
            settings.send_queue.as_str().into(),
            settings.jobs_exchange.as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
}

/// Declares the topology once at start-up, before anything polls or
/// consumes it. A broker that cannot be reached is left to the workers,
/// which wait for it; one without the consistent-hash exchange type stops
/// start-up with the command that enables it.
///
/// # Errors
/// The broker lacks the plugin, or refused the topology (an existing queue
/// with other arguments).
pub async fn declare_at_start(settings: &AmqpSettings) -> anyhow::Result<()> {
    let connection = match super::connect(settings, "sendgate start-up").await {
        Ok(connection) => connection,
        Err(err) => {
            tracing::warn!(error = %err, url = %settings.url.redacted(),
                "cannot reach the broker yet; the workers will wait for it");
            return Ok(());
        }
    };
    let declared = match connection.create_channel().await {
        Ok(channel) => {
            let declared = declare_topology(&channel, settings).await;
            // Closed before the connection, so lapin has nothing to log.
            if channel.status().connected() {
                let _ = channel.close(200, "declared".into()).await;
            }
            declared
        }
        Err(err) => Err(err),
    };
    let _ = connection.close(200, "declared".into()).await;
    match declared {
        Ok(()) => Ok(()),
        Err(err) if err.to_string().contains("unknown exchange type") => anyhow::bail!(
            "the broker at {} has no `{CONSISTENT_HASH}` exchange type, which the job \
             partitions ([amqp] partitions) need: enable RabbitMQ's bundled plugin with \
             `rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}` (it restarts nothing)",
            settings.url.redacted()
        ),
        Err(err) if err.to_string().contains("PRECONDITION_FAILED") => Err(anyhow::Error::new(err)
            .context(format!(
                "cannot declare the queues and exchanges at {} (amqp.url / AMQP_URL)",
                settings.url.redacted()
            ))),
        Err(err) => {
            tracing::warn!(error = %err, "cannot declare the topology yet; the workers will retry");
            Ok(())
        }
    }
}

/// A durable exchange and, when `bound` names one, that (declared) queue
/// bound to it with the routing key.
async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    bound: Option<(&str, &str)>,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let Some((queue, key)) = bound else {
        return Ok(());
    };
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// A durable fanout exchange bound to `queue`: a way in that a broker user
/// can be given write permission on without the default exchange (which
/// reaches every queue).
async fn declare_entrance(channel: &Channel, exchange: &str, queue: &str) -> lapin::Result<()> {
    declare_exchange(channel, exchange, ExchangeKind::Fanout, Some((queue, ""))).await
}

/// A durable quorum queue.
///
/// # Errors
/// The channel failed, or the queue exists with other arguments.
pub async fn declare_quorum(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, arguments)
        .await?;
    Ok(())
}

/// The arguments of a plain quorum queue.
pub fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    arguments
}

/// The send and outcomes queues: broker-level rejects and the delivery
/// limit route to the dead-letter exchange, so no message is redelivered
/// forever.
fn limited_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = quorum_arguments();
    arguments
        .insert(
            "x-dead-letter-exchange".into(),
            long_string(&settings.dead_letter_exchange),
        )
        .insert(
            "x-dead-letter-routing-key".into(),
            long_string(BROKER_DEAD_LETTER_KEY),
        )
        .insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
        );
    arguments
}

/// The partitions' ladder and wait queue: like [`returning_arguments`], but
/// back through the jobs exchange with the routing key the job was held
/// with (its account), so to its partition.
fn to_partition_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = quorum_arguments();
    arguments
        .insert(
            "x-dead-letter-exchange".into(),
            long_string(&settings.jobs_exchange),
        )
        .insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        )
        .insert("x-overflow".into(), long_string("reject-publish"));
    arguments
}

/// The deferral ladder and the wait queue of versions before partitions
/// hold jobs for a while (the
/// ladder's steps by a queue-wide TTL, so a queue's messages expire in the
/// order they came; copies waiting for their charge's forward by a
/// per-message TTL that is the same for all), then dead-letter them back
/// into the send queue, at least once.
fn returning_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = quorum_arguments();
    arguments
        .insert("x-dead-letter-exchange".into(), long_string(""))
        .insert(
            "x-dead-letter-routing-key".into(),
            long_string(&settings.send_queue),
        )
        .insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        )
        .insert("x-overflow".into(), long_string("reject-publish"));
    arguments
}
