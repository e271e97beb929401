//! The periodic upkeep of the database, every `[reservations]
//! sweep_interval_secs`, in three duties ([`upkeep`] runs them in turn):
//!
//! 1. [`commit_expired_holds`]: holds that got no delivery report within
//!    the hold time are committed;
//! 2. [`rotate_reservation_ring`]: the reservation ring's old slot is
//!    emptied once the current one has been current for the dedup window
//!    (`[reservations] dedup_window_secs` as the last `migrate` stored it
//!    in the database; one process does it, the ring's row is locked);
//! 3. [`remove_expired_rows`]: released Free charges older than the window,
//!    confirmed forward batches, refusals past `[jobs]
//!    refusal_retention_days`, published events past `[events]
//!    retention_days` and usage counts past `[usage] retention_days` are
//!    removed, a chunk at a time.
//!
//! Every process runs it; `SKIP LOCKED` and row locks keep them from doing
//! the same rows twice. The usage roll-up ([`roll_up_usage`]) runs apart,
//! every second.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ReservationSettings;
use crate::metrics;
use crate::store::{Store, StoreError};

/// Rows one statement commits at most.
const SWEEP_CHUNK: i64 = 1000;

/// Confirmed forward batches are removed after this long. Nothing needs
/// them once confirmed (a reservation whose batch row is gone counts as
/// confirmed); the delay only spares rows a confirm just wrote.
const FORWARD_BATCH_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// How long the sweep keeps the rows it removes.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub refusals: std::time::Duration,
    pub events: std::time::Duration,
    pub usage_counts: std::time::Duration,
}

/// Runs the three duties every sweep interval until `stop`.
pub async fn upkeep(
    store: Store,
    settings: ReservationSettings,
    retention: Retention,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        commit_expired_holds(&store, &settings).await;
        rotate_reservation_ring(&store).await;
        remove_expired_rows(&store, &retention).await;
    }
}

/// Commits the holds past `[reservations] hold_secs`, a chunk at a time.
async fn commit_expired_holds(store: &Store, settings: &ReservationSettings) {
    loop {
        match store.expire_holds(settings.hold(), SWEEP_CHUNK).await {
            Ok(0) => return,
            Ok(n) => {
                metrics::holds_expired(n);
                info!(committed = n, "expired holds committed");
                if n < SWEEP_CHUNK as u64 {
                    return;
                }
            }
            Err(err) => {
                metrics::db_error(err.kind());
                warn!(error = %err, "cannot sweep expired holds; trying again next interval");
                return;
            }
        }
    }
}

/// Removes forward batches, released Free charges, refusals, published
/// events and usage counts past their retention.
async fn remove_expired_rows(store: &Store, retention: &Retention) {
    purge("forward batches", || {
        store.purge_forward_batches(FORWARD_BATCH_AGE, SWEEP_CHUNK)
    })
    .await;
    purge("released free charges", || {
        store.purge_released_kept(SWEEP_CHUNK)
    })
    .await;
    purge("refusals", || {
        store.purge_refusals(retention.refusals, SWEEP_CHUNK)
    })
    .await;
    purge("events", || {
        store.purge_events(retention.events, SWEEP_CHUNK)
    })
    .await;
    purge("usage counts", || {
        store.purge_usage_counts(retention.usage_counts, SWEEP_CHUNK)
    })
    .await;
}

/// Empties the ring's old slot when it is due (by the window the database
/// holds), and reports the window and the current slot's age.
async fn rotate_reservation_ring(store: &Store) {
    match store.dedup_window().await {
        Ok(window) => metrics::set_dedup_window(window),
        Err(err) => metrics::db_error(err.kind()),
    }
    match store.rotate_reservations().await {
        Ok(Some(slot)) => {
            metrics::slot_emptied();
            info!(
                slot,
                "retention: emptied the reservation slot whose charges are all older than the dedup window; it is current now"
            );
        }
        Ok(None) => {}
        Err(err) => {
            metrics::db_error(err.kind());
            warn!(error = %err, "cannot empty the old reservation slot; trying again next interval");
        }
    }
    match store.ring_slot_age().await {
        Ok(age) => metrics::slot_age(age),
        Err(err) => metrics::db_error(err.kind()),
    }
}

/// Calls `chunk` (which removes up to [`SWEEP_CHUNK`] rows of `what`) until
/// it removes fewer; a failure waits for the next interval.
async fn purge<F>(what: &str, mut chunk: impl FnMut() -> F)
where
    F: Future<Output = Result<u64, StoreError>>,
{
    loop {
        match chunk().await {
            Ok(n) if n < SWEEP_CHUNK as u64 => return,
            Ok(_) => {}
            Err(err) => {
                metrics::db_error(err.kind());
                warn!(error = %err, what, "cannot remove old rows; trying again next interval");
                return;
            }
        }
    }
}

/// How often pending usage is rolled up into the counts.
const USAGE_ROLLUP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Rolls pending usage up every second until `stop` (and once more at
/// stop, so a process that is the last to go leaves little behind). Every
/// process runs it; one at a time does the work.
pub async fn roll_up_usage(store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(USAGE_ROLLUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        if let Err(err) = store.roll_up_usage().await {
            metrics::db_error(err.kind());
            warn!(error = %err, "cannot roll usage up; trying again in a second");
        }
        if stopping {
            return;
        }
    }
}
