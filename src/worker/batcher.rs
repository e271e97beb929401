//! When gathered deliveries become a batch, and which. Pure: the caller says
//! what time it is and how many batches are being decided, so every rule is
//! unit-tested here.
//!
//! A full batch starts whenever fewer than `concurrent` are being decided;
//! a partial one only when none is, once its oldest delivery has waited
//! `wait` (at once when stopping). So a second transaction runs only when
//! jobs back up, and no job waits for company longer than it must. Which
//! deliveries make a batch is the fair draw's choice ([`super::fair`]):
//! round-robin over the sources (channels) that hold some.

use std::time::{Duration, Instant};

use super::fair::FairQueue;

/// Anything that knows when it arrived, and from which source.
pub trait Arrival {
    fn arrived(&self) -> Instant;
    fn source(&self) -> usize;
}

impl Arrival for crate::amqp::session::Received {
    fn arrived(&self) -> Instant {
        self.at
    }

    fn source(&self) -> usize {
        self.channel
    }
}

/// How a batcher is sized.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub batch_size: usize,
    pub wait: Duration,
    pub concurrent: usize,
    /// Sources deliveries come from (channels).
    pub sources: usize,
    /// Deliveries held at most: all the sources' prefetch windows, so every
    /// source's deliveries are seen when a batch is drawn.
    pub capacity: usize,
}

/// Deliveries received and not yet in a batch.
pub struct Batcher<T> {
    waiting: FairQueue<T>,
    sizes: Sizes,
}

impl<T: Arrival> Batcher<T> {
    pub fn new(sizes: Sizes) -> Self {
        Batcher {
            waiting: FairQueue::new(sizes.sources),
            sizes,
        }
    }

    /// Whether another delivery may be taken in.
    pub fn has_room(&self) -> bool {
        self.waiting.len() < self.sizes.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn push(&mut self, item: T) {
        self.waiting.push(item.source(), item);
    }

    /// The oldest delivery waiting.
    fn oldest(&self) -> Option<Instant> {
        self.waiting.heads().map(Arrival::arrived).min()
    }

    /// The next batch to start now, if any, while `deciding` batches are
    /// being decided.
    pub fn next_batch(&mut self, deciding: usize, stopping: bool, now: Instant) -> Option<Vec<T>> {
        let oldest = self.oldest()?;
        if deciding >= self.sizes.concurrent {
            return None;
        }
        let full = self.waiting.len() >= self.sizes.batch_size;
        let due =
            deciding == 0 && (stopping || now.saturating_duration_since(oldest) >= self.sizes.wait);
        if !(full || due) {
            return None;
        }
        Some(self.waiting.take(self.sizes.batch_size))
    }

    /// When the partial batch waiting falls due, if nothing else will wake
    /// the caller first (no batch is being decided).
    pub fn due_at(&self, deciding: usize) -> Option<Instant> {
        let oldest = self.oldest().filter(|_| deciding == 0)?;
        oldest.checked_add(self.sizes.wait)
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

        fn source(&self) -> usize {
            0
        }
    }

    /// One source, holding at most one batch.
    fn batcher(batch_size: usize, wait: Duration, concurrent: usize) -> Batcher<Job> {
        Batcher::new(Sizes {
            batch_size,
            wait,
            concurrent,
            sources: 1,
            capacity: batch_size,
        })
    }

    const WAIT: Duration = Duration::from_millis(3);

    #[test]
    fn a_partial_batch_starts_once_its_oldest_job_has_waited() {
        let t0 = Instant::now();
        let mut batcher = batcher(4, WAIT, 2);
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
        let mut batcher = batcher(2, WAIT, 2);
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
        let mut batcher = batcher(1, WAIT, 2);
        batcher.push(Job(t0));
        assert!(batcher.next_batch(2, true, t0).is_none());
        assert!(batcher.next_batch(1, false, t0).is_some());
    }

    #[test]
    fn stopping_starts_what_is_left_at_once() {
        let t0 = Instant::now();
        let mut batcher = batcher(8, WAIT, 2);
        batcher.push(Job(t0));
        assert_eq!(batcher.next_batch(0, true, t0).map(|b| b.len()), Some(1));
    }

    #[test]
    fn a_huge_wait_never_overflows() {
        let t0 = Instant::now();
        let mut batcher = batcher(8, Duration::MAX, 2);
        batcher.push(Job(t0));
        assert_eq!(batcher.due_at(0), None);
        assert!(batcher.next_batch(0, false, t0).is_none());
    }

    struct From(usize, Instant);

    impl Arrival for From {
        fn arrived(&self) -> Instant {
            self.1
        }

        fn source(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn a_batch_is_drawn_round_robin_and_waits_for_the_oldest_of_any_source() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(Sizes {
            batch_size: 4,
            wait: WAIT,
            concurrent: 2,
            sources: 3,
            capacity: 100,
        });
        for _ in 0..50 {
            batcher.push(From(0, t0 + WAIT));
        }
        assert!(
            batcher.has_room(),
            "more than a batch is held, so every source is seen"
        );
        batcher.push(From(2, t0));
        assert_eq!(
            batcher.due_at(0),
            Some(t0 + WAIT),
            "the oldest is source 2's"
        );
        let batch = batcher.next_batch(1, false, t0).expect("full");
        let sources: Vec<usize> = batch.iter().map(|f| f.0).collect();
        assert_eq!(sources, [0, 2, 0, 0]);
    }
}
