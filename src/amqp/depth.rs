//! Queue depths for dashboards and alerts: every queue sendgate owns (the
//! send queue and its partitions, delivery, dead-letter, outcomes, the
//! deferral ladder, wait) is polled with passive declares (cheap: no
//! consumer, no message moves) on a connection of their own, so a slow or
//! failing poll never touches the gate's channels. The partitions are also
//! reported one by one.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::AmqpSettings;

/// Polls every `interval` until `stop`; reconnects quietly when the broker
/// goes away (the gate's workers already log and count that).
pub async fn poll(settings: AmqpSettings, interval: Duration, stop: CancellationToken) {
    // The deferred role is the whole deferral ladder (the partitions' and
    // the one before them), and the queue older versions deferred to; the
    // waiting role both wait queues.
    let mut deferred = vec![settings.deferred_queue.clone()];
    deferred.extend(settings.deferral_steps().into_iter().map(|(_, q)| q));
    deferred.extend(settings.partition_ladder().into_iter().map(|(_, q)| q));
    let job_queues = settings.job_queues();
    let queues = [
        ("send", job_queues.clone()),
        ("delivery", vec![settings.delivery_queue.clone()]),
        ("dead_letter", vec![settings.dead_letter_queue.clone()]),
        ("outcomes", vec![settings.outcomes_queue.clone()]),
        ("deferred", deferred),
        (
            "waiting",
            vec![settings.wait_queue.clone(), settings.partition_wait_queue()],
        ),
    ];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<lapin::Connection> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if connection.as_ref().is_none_or(|c| !c.status().connected()) {
            connection = crate::amqp::connect(&settings, "sendgate queue depth")
                .await
                .map_err(|err| debug!(error = %err, "queue depth: cannot connect"))
                .ok();
        }
        let Some(conn) = &connection else { continue };
        // A passive declare of a missing queue closes its channel, so each
        // round uses a fresh one.
        let Ok(channel) = conn.create_channel().await else {
            connection = None;
            continue;
        };
        'roles: for (role, names) in &queues {
            let mut messages = 0u32;
            for (index, name) in names.iter().enumerate() {
                let declared = channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                match declared {
                    Ok(queue) => {
                        messages = messages.saturating_add(queue.message_count());
                        if *role == "send" {
                            crate::metrics::partition_messages(index, queue.message_count());
                        }
                    }
                    Err(err) => {
                        debug!(queue = %name, error = %err, "queue depth: cannot read");
                        break 'roles;
                    }
                }
            }
            crate::metrics::queue_messages(role, messages);
        }
        let _ = channel.close(200, "done".into()).await;
    }
    if let Some(conn) = connection {
        let _ = conn.close(200, "sendgate shutting down".into()).await;
    }
}
