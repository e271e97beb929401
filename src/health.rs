//! Readiness as the workers see it: how many hold a live broker connection,
//! whether the database answered last time, and whether we are draining.
//! Atomics, because every worker writes and `/readyz` reads without waiting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Health {
    workers: usize,
    broker_connected: AtomicUsize,
    database_ok: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            broker_connected: AtomicUsize::new(0),
            database_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
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

    /// Every worker connected to the broker.
    pub fn broker_ok(&self) -> bool {
        self.broker_connected.load(Ordering::SeqCst) >= self.workers
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
