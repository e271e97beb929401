//! `sendgate run`: wires the store, the HTTP listener and the gate workers
//! together, and drains them on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::Settings;
use crate::gate::{Gate, Marks, Role};
use crate::health::Health;
use crate::plan::Limits;
use crate::store::Store;

/// A started sendgate: migrated database and bound HTTP listener, ready to
/// [`App::run`].
pub struct App {
    gate: Arc<Gate>,
    listener: TcpListener,
    marker: tokio::task::JoinHandle<()>,
    close_marker: CancellationToken,
}

impl App {
    /// Prepares the database (creating and migrating it, waiting while it is
    /// unreachable) and binds the HTTP listener.
    ///
    /// # Errors
    /// The listen address cannot be bound, or the database refuses us for a
    /// reason waiting will not fix (bad credentials, failed migration).
    pub async fn build(
        settings: Settings,
        clock: Arc<dyn Clock>,
        stop: &CancellationToken,
    ) -> anyhow::Result<App> {
        crate::metrics::install();
        let store = prepare_database(&settings, stop).await?;
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot listen on http.listen = {}", settings.http.listen))?;
        // The jobs worker and the outcomes worker.
        let health = Arc::new(Health::new(2));
        health.set_database_ok(true);
        let close_marker = CancellationToken::new();
        let (marks, marker) = Marks::spawn(store.clone(), close_marker.clone());
        Ok(App {
            gate: Arc::new(Gate {
                settings,
                store,
                clock,
                health,
                marks,
                connection: tokio::sync::Mutex::new(None),
            }),
            listener,
            marker,
            close_marker,
        })
    }

    /// The address `/metrics` and friends are served on.
    ///
    /// # Errors
    /// Only if the socket was closed under us.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves HTTP and runs the workers until `stop` is cancelled, then
    /// drains: workers finish their batch within the grace period; what is
    /// not finished by then is left unacked for the broker to redeliver.
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let App {
            gate,
            listener,
            marker,
            close_marker,
        } = self;
        let metrics = crate::metrics::install();
        let http_stop = CancellationToken::new();
        let router = crate::http::router(metrics.clone(), gate.health.clone(), gate.store.clone())
            .merge(crate::api::router(
                gate.store.clone(),
                gate.clock.clone(),
                gate.settings.api.token.clone(),
            ));
        let http = tokio::spawn({
            let http_stop = http_stop.clone();
            async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(http_stop.cancelled_owned())
                    .await
            }
        });
        let upkeep = tokio::spawn({
            let http_stop = http_stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = http_stop.cancelled() => return,
                        _ = tick.tick() => metrics.run_upkeep(),
                    }
                }
            }
        });

        let depth = gate.settings.amqp.depth_poll().map(|interval| {
            tokio::spawn(crate::depth::poll(
                gate.settings.amqp.clone(),
                interval,
                http_stop.clone(),
            ))
        });
        let mut workers = tokio::task::JoinSet::new();
        workers.spawn(gate.clone().run_worker(0, Role::Jobs, stop.clone()));
        workers.spawn(gate.clone().run_worker(1, Role::Outcomes, stop.clone()));
        let sweeper = tokio::spawn(sweep_expired_holds(
            gate.store.clone(),
            gate.settings.reservations.clone(),
            stop.clone(),
        ));

        stop.cancelled().await;
        gate.health.set_draining();
        let grace = gate.settings.shutdown.grace_period();
        info!(grace_period = ?grace, "draining in-flight jobs");
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(grace_period = ?grace,
                "grace period ran out; unfinished jobs are left unacknowledged for redelivery");
            workers.shutdown().await;
        }
        gate.close_connection().await;
        let _ = sweeper.await;
        close_marker.cancel();
        let _ = marker.await;
        http_stop.cancel();
        let _ = upkeep.await;
        if let Some(depth) = depth {
            let _ = depth.await;
        }
        match http.await {
            Ok(result) => result.context("HTTP server failed")?,
            Err(err) => warn!(error = %err, "HTTP task ended abnormally"),
        }
        gate.store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// Commits holds that got no outcome within the hold time, every sweep
/// interval, until `stop`. Every process sweeps; `SKIP LOCKED` keeps them
/// from doing the same rows twice.
async fn sweep_expired_holds(
    store: Store,
    settings: crate::config::ReservationSettings,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match store.expire_holds(settings.hold(), 1000).await {
                Ok(0) => break,
                Ok(n) => {
                    crate::metrics::holds_expired(n);
                    info!(committed = n, "expired holds committed");
                    if n < 1000 {
                        break;
                    }
                }
                Err(err) => {
                    crate::metrics::db_error(err.kind());
                    warn!(error = %err, "cannot sweep expired holds; trying again next interval");
                    break;
                }
            }
        }
    }
}

/// Creates and migrates the database, retrying while it is unreachable.
async fn prepare_database(settings: &Settings, stop: &CancellationToken) -> anyhow::Result<Store> {
    let limits = limits(settings);
    let store = Store::connect_lazy(&settings.database, limits)?;
    let mut backoff = backoff::ExponentialBackoffBuilder::new()
        .with_max_interval(Duration::from_secs(10))
        .with_max_elapsed_time(None)
        .build();
    loop {
        let attempt = async {
            Store::create_database_if_missing(settings.database.url.expose()).await?;
            store.migrate().await
        };
        match attempt.await {
            Ok(()) => return Ok(store),
            Err(err) if err.is_transient() => {
                let delay = backoff::backoff::Backoff::next_backoff(&mut backoff)
                    .unwrap_or(Duration::from_secs(10));
                warn!(error = %err, url = %settings.database.url.redacted(), retry_in = ?delay,
                    "database unreachable; waiting for it");
                tokio::select! {
                    _ = stop.cancelled() => anyhow::bail!("stopped while waiting for the database"),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot prepare the database at {}",
                        settings.database.url.redacted()
                    )
                });
            }
        }
    }
}

/// The plan limits from configuration.
pub fn limits(settings: &Settings) -> Limits {
    Limits {
        signup_credits: i64::from(settings.plans.free.signup_credits),
        daily_sends: i64::from(settings.plans.pro.daily_sends),
    }
}
