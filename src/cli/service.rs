//! `run`, `migrate` and `config`, and the store a one-shot command opens.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use sendgate::clock::SystemClock;
use sendgate::config::Settings;
use sendgate::store::Store;
use tokio_util::sync::CancellationToken;

/// `sendgate run`: gates jobs until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    sendgate::shutdown::on_signal(stop.clone());
    let app = match sendgate::app::App::build(settings, Arc::new(SystemClock), &stop).await {
        Ok(app) => app,
        // Asked to stop before it could start: a normal stop.
        Err(_) if stop.is_cancelled() => {
            tracing::info!("stopped before start-up finished");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    tracing::info!(http = %app.http_addr()?, "sendgate started");
    app.run(stop).await
}

/// `sendgate migrate`.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    open_store(settings, true).await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// `sendgate config`: the effective settings, passwords redacted.
pub fn print_config(settings: &Settings) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, settings)?;
    writeln!(out)?;
    Ok(())
}

/// The store for a one-shot command: created and migrated when `migrate`
/// (always migrates) or `[database] migrate_on_start` says so, else only
/// checked to be migrated (the runtime role may not migrate).
pub async fn open_store(settings: &Settings, migrate: bool) -> anyhow::Result<Store> {
    let url = settings.database.url.redacted();
    let store = Store::for_settings(settings)?;
    store.locate_primary().await;
    if !migrate {
        store.check_migrated().await.with_context(|| {
            format!("cannot use the database at {url} (database.url / DATABASE_URL)")
        })?;
        return Ok(store);
    }
    Store::create_database_if_missing(settings.database.url.expose())
        .await
        .with_context(|| {
            format!("cannot reach the database at {url} (database.url / DATABASE_URL)")
        })?;
    store.migrate().await.with_context(|| {
        format!("cannot migrate the database at {url} (database.url / DATABASE_URL)")
    })?;
    Ok(store)
}
