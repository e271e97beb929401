//! The process's one broker connection, and a worker's session on it: its
//! channels, each with a consumer, prefetch and publisher confirms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use crate::config::AmqpSettings;

/// Why a worker must drop its broker session and start a new one.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the consumer stream ended (consumer cancelled or channel closed)")]
    ConsumerEnded,
    #[error("an ack could not be sent: the channel has failed")]
    AckFailed,
    #[error("a publish was not confirmed within {0:?}")]
    ConfirmTimeout(Duration),
    /// A bug of ours found while handling a batch: the batch is held
    /// (never acked), the session ends and the broker delivers it again.
    #[error("internal error, batch held: {0}")]
    Internal(String),
}

/// A delivery, when it arrived, which of the session's channels it came
/// on, and its span when traces are exported ([`super::trace`]), which
/// ends when the delivery is dropped (after its ack).
pub struct Received {
    pub delivery: Delivery,
    pub at: Instant,
    pub channel: usize,
    pub span: Option<tracing::Span>,
}

impl Received {
    /// A job, arrived now.
    pub fn job(delivery: Delivery, channel: usize) -> Received {
        let span = super::trace::job_span(&delivery.properties);
        Received {
            delivery,
            at: Instant::now(),
            channel,
            span,
        }
    }

    /// A delivery report, arrived now.
    pub fn report(delivery: Delivery) -> Received {
        let span = super::trace::settle_span(&delivery.properties);
        Received {
            delivery,
            at: Instant::now(),
            channel: 0,
            span,
        }
    }

    /// The delivery's `message_id` property, if it has one.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
    }
}

/// A worker's session: channels on the shared connection, a consumer on
/// each. Outcomes are published on the first channel.
pub struct Session {
    pub connection: Arc<Connection>,
    pub channels: Vec<Channel>,
    pub consumers: Vec<Consumer>,
}

impl Session {
    /// Closes the session's channels; unacked deliveries go back to their
    /// queue.
    pub async fn close(&self, reason: &str) {
        for channel in &self.channels {
            let _ = channel.close(200, reason.into()).await;
        }
    }
}

/// The process's broker connection, shared by every worker (each on its
/// own channels): one connection means one I/O thread, not one per worker.
pub struct Broker {
    settings: AmqpSettings,
    /// A tokio mutex: connecting awaits while it is held, so concurrent
    /// workers wait for one connection instead of opening several.
    slot: tokio::sync::Mutex<Slot>,
}

/// The shared connection, and which node of `amqp.url` to try first for
/// the next one.
#[derive(Default)]
struct Slot {
    connection: Option<Arc<Connection>>,
    next_node: usize,
}

impl Broker {
    pub fn new(settings: AmqpSettings) -> Self {
        Broker {
            settings,
            slot: tokio::sync::Mutex::default(),
        }
    }

    /// The shared connection; opens it when there is none or the last one
    /// broke. A new connection goes to the node after the one the last
    /// connection was on (the first node at start-up): when a node dies,
    /// the process moves to a live one at once, and a node that is back
    /// gets its turn again later.
    async fn connection(&self) -> lapin::Result<Arc<Connection>> {
        let mut slot = self.slot.lock().await;
        if let Some(connection) = slot.connection.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let (connection, node) =
            super::connect_from(&self.settings, "sendgate", slot.next_node).await?;
        let connection = Arc::new(connection);
        slot.connection = Some(connection.clone());
        slot.next_node = node + 1;
        Ok(connection)
    }

    /// A channel with publisher confirms on the shared connection, for a
    /// one-off publish; the caller closes it.
    ///
    /// # Errors
    /// The broker is unreachable or refused the channel.
    pub async fn side_channel(&self) -> lapin::Result<Channel> {
        let channel = self.connection().await?.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// Forgets (and closes) `connection` if it is still the shared one.
    pub async fn drop_connection(&self, connection: &Arc<Connection>) {
        let mut slot = self.slot.lock().await;
        if slot
            .connection
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, connection))
        {
            slot.connection = None;
            drop(slot);
            let _ = connection.close(320, "sendgate reconnecting".into()).await;
        }
    }

    /// Closes the shared connection, once every worker has stopped.
    pub async fn close(&self) {
        if let Some(connection) = self.slot.lock().await.connection.take() {
            let _ = connection.close(200, "sendgate shutting down".into()).await;
        }
    }

    /// Opens `per_queue` channels consuming each of `queues`, tagged
    /// `tag-N`, channel by channel in the order of `queues`; the first one
    /// declares the topology first.
    ///
    /// # Errors
    /// The broker is unreachable or refused a channel; no consumer is left
    /// behind then.
    pub async fn open_session(
        &self,
        queues: &[String],
        per_queue: usize,
        tag: &str,
    ) -> lapin::Result<Session> {
        let connection = self.connection().await?;
        let count = queues.len() * per_queue;
        let mut session = Session {
            connection,
            channels: Vec::with_capacity(count),
            consumers: Vec::with_capacity(count),
        };
        let each = queues
            .iter()
            .flat_map(|q| std::iter::repeat_n(q, per_queue));
        for (i, queue) in each.enumerate() {
            match self
                .open_channel(&session.connection, queue, format!("{tag}-{i}"), i == 0)
                .await
            {
                Ok((channel, consumer)) => {
                    session.channels.push(channel);
                    session.consumers.push(consumer);
                }
                Err(err) => {
                    session.close("sendgate reconnecting").await;
                    if !session.connection.status().connected() {
                        self.drop_connection(&session.connection).await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(session)
    }

    async fn open_channel(
        &self,
        connection: &Connection,
        queue: &str,
        tag: String,
        declare: bool,
    ) -> lapin::Result<(Channel, Consumer)> {
        let channel = connection.create_channel().await?;
        if declare {
            super::declare_topology(&channel, &self.settings).await?;
        }
        // basic.qos is per channel: applied on every new session.
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }
}
