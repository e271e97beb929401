//! When gathered deliveries become a batch. Pure: the caller says what time
//! it is and how many batches are being decided, so every rule is
//! unit-tested here.
//!
//! A full batch starts whenever fewer than `concurrent` are being decided;
//! a partial one only when none is, once its oldest delivery has waited
//! `wait` (at once when stopping). So a second transaction runs only when
//! jobs back up, and no job waits for company longer than it must.

use std::time::{Duration, Instant};

/// Anything that knows when it arrived.
pub trait Arrival {
    fn arrived(&self) -> Instant;
}

impl Arrival for crate::amqp::session::Received {
    fn arrived(&self) -> Instant {
        self.at
    }
}

/// Deliveries received and not yet in a batch, oldest first.
pub struct Batcher<T> {
    waiting: Vec<T>,
    batch_size: usize,
    wait: Duration,
    concurrent: usize,
}

impl<T: Arrival> Batcher<T> {
    pub fn new(batch_size: usize, wait: Duration, concurrent: usize) -> Self {
        Batcher {
            waiting: Vec::with_capacity(batch_size),
            batch_size,
            wait,
            concurrent,
        }
    }

    /// Whether another delivery may be taken in (a full batch waits).
    pub fn has_room(&self) -> bool {
        self.waiting.len() < self.batch_size
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn push(&mut self, item: T) {
        self.waiting.push(item);
    }

    /// The next batch to start now, if any, while `deciding` batches are
    /// being decided.
    pub fn next_batch(&mut self, deciding: usize, stopping: bool, now: Instant) -> Option<Vec<T>> {
        let oldest = self.waiting.first()?;
        if deciding >= self.concurrent {
            return None;
        }
        let full = self.waiting.len() >= self.batch_size;
        let due = deciding == 0
            && (stopping || now.saturating_duration_since(oldest.arrived()) >= self.wait);
        if !(full || due) {
            return None;
        }
        let size = self.waiting.len().min(self.batch_size);
        Some(self.waiting.drain(..size).collect())
    }

    /// When the partial batch waiting falls due, if nothing else will wake
    /// the caller first (no batch is being decided).
    pub fn due_at(&self, deciding: usize) -> Option<Instant> {
        let oldest = self.waiting.first().filter(|_| deciding == 0)?;
        oldest.arrived().checked_add(self.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Job(Instant);

    impl Arrival for Job {
        fn arrived(&self) -> Instant {
            self.0
        }
    }

    const WAIT: Duration = Duration::from_millis(3);

    #[test]
    fn a_partial_batch_starts_once_its_oldest_job_has_waited() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(4, WAIT, 2);
        batcher.push(Job(t0));
        batcher.push(Job(t0 + Duration::from_millis(1)));
        assert!(batcher.next_batch(0, false, t0).is_none());
        assert_eq!(batcher.due_at(0), Some(t0 + WAIT));
        let batch = batcher.next_batch(0, false, t0 + WAIT).expect("due");
        assert_eq!(batch.len(), 2);
        assert!(batcher.is_empty() && batcher.due_at(0).is_none());
    }

    #[test]
    fn a_partial_batch_waits_while_another_is_decided_but_a_full_one_does_not() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(2, WAIT, 2);
        batcher.push(Job(t0));
        let late = t0 + Duration::from_secs(1);
        assert!(batcher.next_batch(1, false, late).is_none());
        assert_eq!(
            batcher.due_at(1),
            None,
            "the decided batch wakes the caller"
        );
        batcher.push(Job(t0));
        assert!(!batcher.has_room());
        assert_eq!(batcher.next_batch(1, false, t0).map(|b| b.len()), Some(2));
    }

    #[test]
    fn no_batch_starts_beyond_the_concurrency_limit() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(1, WAIT, 2);
        batcher.push(Job(t0));
        assert!(batcher.next_batch(2, true, t0).is_none());
        assert!(batcher.next_batch(1, false, t0).is_some());
    }

    #[test]
    fn stopping_starts_what_is_left_at_once() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(8, WAIT, 2);
        batcher.push(Job(t0));
        assert_eq!(batcher.next_batch(0, true, t0).map(|b| b.len()), Some(1));
    }

    #[test]
    fn a_huge_wait_never_overflows() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(8, Duration::MAX, 2);
        batcher.push(Job(t0));
        assert_eq!(batcher.due_at(0), None);
        assert!(batcher.next_batch(0, false, t0).is_none());
    }
}
