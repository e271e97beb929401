//! `sendgate run`: wires the store, the HTTP listener and the workers
//! together, and drains them on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::session::Broker;
use crate::clock::Clock;
use crate::config::Settings;
use crate::health::Health;
use crate::retry;
use crate::store::Store;
use crate::worker::{self, JobsWorker, OutcomesWorker, Shared};

/// How often the metrics exporter's histograms are maintained.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// How often (and how long at most) the database is probed for `/readyz`.
const DATABASE_PROBE: Duration = Duration::from_secs(2);

/// A started sendgate: migrated database and bound HTTP listener, ready to
/// [`App::run`].
pub struct App {
    shared: Arc<Shared>,
    listener: TcpListener,
}

/// What runs beside the workers until they have drained.
struct Background {
    http: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    depth: Option<JoinHandle<()>>,
    stop: CancellationToken,
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
        crate::amqp::topology::declare_at_start(&settings.amqp).await?;
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot listen on http.listen = {}", settings.http.listen))?;
        // The jobs worker and the outcomes worker.
        let health = Arc::new(Health::new(2));
        health.set_database_ok(true);
        let broker = Broker::new(settings.amqp.clone());
        Ok(App {
            shared: Arc::new(Shared {
                settings,
                store,
                clock,
                health,
                broker,
            }),
            listener,
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
        let App { shared, listener } = self;
        let background = serve(&shared, listener);
        let mut workers = tokio::task::JoinSet::new();
        workers.spawn(worker::run(
            JobsWorker {
                shared: shared.clone(),
                id: 0,
            },
            stop.clone(),
        ));
        workers.spawn(worker::run(
            OutcomesWorker {
                shared: shared.clone(),
                id: 1,
            },
            stop.clone(),
        ));
        let sweeper = tokio::spawn(worker::sweep::upkeep(
            shared.store.clone(),
            shared.settings.reservations.clone(),
            worker::sweep::Retention {
                refusals: shared.settings.jobs.refusal_retention(),
                events: shared.settings.events.retention(),
                usage_counts: shared.settings.usage.retention(),
            },
            stop.clone(),
        ));
        let relay = tokio::spawn(worker::events::relay(shared.clone(), stop.clone()));
        let rollup = tokio::spawn(worker::sweep::roll_up_usage(
            shared.store.clone(),
            stop.clone(),
        ));
        let audit = shared.settings.audit.interval().map(|interval| {
            tokio::spawn(worker::audit::run(
                shared.store.clone(),
                worker::audit::rules(&shared.settings),
                interval,
                stop.clone(),
            ))
        });

        stop.cancelled().await;
        shared.health.set_draining();
        let grace = shared.settings.shutdown.grace_period();
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
        let _ = relay.await;
        shared.broker.close().await;
        let _ = sweeper.await;
        let _ = rollup.await;
        if let Some(audit) = audit {
            let _ = audit.await;
        }
        background.stop().await?;
        shared.store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// Starts the HTTP server, the metrics upkeep and the queue depth poll.
fn serve(shared: &Arc<Shared>, listener: TcpListener) -> Background {
    let metrics = crate::metrics::install();
    let stop = CancellationToken::new();
    let router = crate::http::router(
        metrics.clone(),
        shared.health.clone(),
        shared.store.clone(),
        shared.clock.clone(),
        &shared.settings.api,
    );
    let http = tokio::spawn({
        let (settings, stop) = (shared.settings.http.clone(), stop.clone());
        async move { crate::http::server::serve(listener, router, &settings, stop).await }
    });
    let upkeep = tokio::spawn({
        let (stop, store, health) = (stop.clone(), shared.store.clone(), shared.health.clone());
        async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            let mut probe = tokio::time::interval(DATABASE_PROBE);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => metrics.run_upkeep(),
                    // What /readyz reports about the database, between
                    // batches; and the pool's size.
                    _ = probe.tick() => {
                        health.set_database_ok(store.ping(DATABASE_PROBE).await);
                        let (open, idle, max) = store.pool_usage();
                        crate::metrics::db_pool(open, idle, max);
                    }
                }
            }
        }
    });
    let depth = shared.settings.amqp.depth_poll().map(|interval| {
        tokio::spawn(crate::amqp::depth::poll(
            shared.settings.amqp.clone(),
            interval,
            stop.clone(),
        ))
    });
    Background {
        http,
        upkeep,
        depth,
        stop,
    }
}

impl Background {
    /// Stops the HTTP server and the pollers, once the workers are done.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let _ = self.upkeep.await;
        if let Some(depth) = self.depth {
            let _ = depth.await;
        }
        if let Err(err) = self.http.await {
            warn!(error = %err, "HTTP task ended abnormally");
        }
        Ok(())
    }
}

/// Creates and migrates the database (or, with `[database] migrate_on_start`
/// off, checks that it is migrated), retrying while it is unreachable.
async fn prepare_database(settings: &Settings, stop: &CancellationToken) -> anyhow::Result<Store> {
    let store = Store::for_settings(settings)?;
    let url = settings.database.url.redacted();
    let (store_ref, database_url) = (&store, settings.database.url.expose());
    let migrate = settings.database.migrate_on_start;
    let prepared = retry::until_ok(
        move || async move {
            store_ref.locate_primary().await;
            if !migrate {
                return store_ref.check_migrated().await;
            }
            Store::create_database_if_missing(database_url).await?;
            store_ref.migrate().await
        },
        |err, delay| {
            let wait = err.is_transient() && !err.is_misconfiguration();
            if wait {
                warn!(error = %err, url = %url, retry_in = ?delay, "database unreachable; waiting for it");
            }
            wait
        },
    );
    tokio::select! {
        _ = stop.cancelled() => anyhow::bail!("stopped while waiting for the database"),
        prepared = prepared => {
            prepared.with_context(|| {
                format!("cannot prepare the database at {url} (database.url / DATABASE_URL)")
            })?;
            Ok(store)
        }
    }
}
