//! Readiness as the workers see it: how many hold a live broker connection,
//! whether the database answered last time, and whether we are draining.
//! Atomics, because every worker writes and `/readyz` reads without waiting.
//!
//! Also what an operator asked of this process: whether taking jobs is
//! paused (`sendgate ctl pause`), who asked and when.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

#[derive(Debug)]
pub struct Health {
    workers: usize,
    broker_connected: AtomicUsize,
    database_ok: AtomicBool,
    draining: AtomicBool,
    /// Taking jobs is paused: asked for (the watch) and in effect (the
    /// jobs workers have finished their batches and closed their sessions).
    pause_asked: watch::Sender<bool>,
    paused_workers: AtomicUsize,
    pause_changed: Mutex<Option<PauseChange>>,
}

/// The last pause or resume: who asked, and when.
#[derive(Debug, Clone)]
pub struct PauseChange {
    pub by: String,
    pub at: DateTime<Utc>,
}

/// Where taking jobs stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsumingState {
    /// Taking jobs.
    Consuming,
    /// Paused: finishing the batches in hand before closing the sessions.
    Pausing,
    /// Paused: taking no jobs; the ones prefetched went back to the queue.
    Paused,
}

impl Health {
    pub fn new(workers: usize) -> Self {
        crate::metrics::set_paused(false);
        Self {
            workers,
            broker_connected: AtomicUsize::new(0),
            database_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            pause_asked: watch::Sender::new(false),
            paused_workers: AtomicUsize::new(0),
            pause_changed: Mutex::new(None),
        }
    }

    /// Pauses (or resumes) taking jobs; false when it already was so.
    pub fn set_paused(&self, paused: bool, by: &str, at: DateTime<Utc>) -> bool {
        let changed = self.pause_asked.send_if_modified(|asked| {
            let changed = *asked != paused;
            *asked = paused;
            changed
        });
        if changed {
            *self.pause_changed.lock().unwrap_or_else(|e| e.into_inner()) = Some(PauseChange {
                by: by.to_owned(),
                at,
            });
            crate::metrics::set_paused(paused);
            tracing::warn!(
                by,
                paused,
                "taking jobs {}",
                if paused { "paused" } else { "resumed" }
            );
        }
        changed
    }

    /// Follows the pause asked for (true: paused).
    pub fn pause_requests(&self) -> watch::Receiver<bool> {
        self.pause_asked.subscribe()
    }

    pub fn pause_asked(&self) -> bool {
        *self.pause_asked.borrow()
    }

    /// A jobs worker closed its session for a pause (true) or took up
    /// consuming again (false).
    pub fn worker_paused(&self, paused: bool) {
        if paused {
            self.paused_workers.fetch_add(1, Ordering::SeqCst);
        } else {
            self.paused_workers.fetch_sub(1, Ordering::SeqCst);
        }
        self.publish();
    }

    /// Where taking jobs stands, given how many jobs workers there are.
    pub fn consuming_state(&self, jobs_workers: usize) -> ConsumingState {
        if !self.pause_asked() {
            ConsumingState::Consuming
        } else if self.paused_workers.load(Ordering::SeqCst) >= jobs_workers {
            ConsumingState::Paused
        } else {
            ConsumingState::Pausing
        }
    }

    pub fn last_pause_change(&self) -> Option<PauseChange> {
        self.pause_changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn broker_connected(&self) {
        self.broker_connected.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }

    pub fn broker_disconnected(&self) {
        self.broker_connected.fetch_sub(1, Ordering::SeqCst);
        self.publish();
    }

    pub fn set_database_ok(&self, ok: bool) {
        if self.database_ok.swap(ok, Ordering::SeqCst) != ok {
            self.publish();
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish();
    }

    /// Every worker connected to the broker, or paused on purpose.
    pub fn broker_ok(&self) -> bool {
        self.broker_connected.load(Ordering::SeqCst) + self.paused_workers.load(Ordering::SeqCst)
            >= self.workers
    }

    pub fn database_ok(&self) -> bool {
        self.database_ok.load(Ordering::SeqCst)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn ready(&self) -> bool {
        self.broker_ok() && self.database_ok() && !self.draining()
    }

    fn publish(&self) {
        crate::metrics::set_ready(self.ready());
    }
}
