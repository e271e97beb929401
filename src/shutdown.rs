//! SIGTERM and SIGINT become a cancelled token that every task watches.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `stop` on the first SIGTERM or SIGINT.
pub fn on_signal(stop: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => info!("SIGINT received; draining"),
                        _ = term.recv() => info!("SIGTERM received; draining"),
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                    info!("SIGINT received; draining");
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
            info!("interrupt received; draining");
        }
        stop.cancel();
    });
}
