//! The fair draw: jobs gathered from several queues (the partitions and the
//! send queue) and taken round-robin over the queues that hold some, so k
//! busy queues each get about 1/k of every batch, and a queue with one job
//! waits for at most one turn, not for another queue's backlog. Pure, so
//! every rule is unit-tested here.
//!
//! Each queue's jobs are taken in the order they came (a channel's
//! deliveries must be acked in order), and the turn carries over from one
//! batch to the next, so no queue is favoured by where a batch happens to
//! begin. All jobs cost the same, so a deficit round-robin is a plain
//! round-robin here.

use std::collections::VecDeque;

/// Items waiting, per source, oldest first within each source.
pub struct FairQueue<T> {
    sources: Vec<VecDeque<T>>,
    /// The source whose turn is next.
    turn: usize,
    len: usize,
}

impl<T> FairQueue<T> {
    pub fn new(sources: usize) -> Self {
        FairQueue {
            sources: (0..sources.max(1)).map(|_| VecDeque::new()).collect(),
            turn: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `item` behind the others of `source`.
    ///
    /// # Panics
    /// `source` is not one of the sources this queue was made for (a bug).
    pub fn push(&mut self, source: usize, item: T) {
        self.sources[source].push_back(item);
        self.len += 1;
    }

    /// The oldest item of each source that holds some.
    pub fn heads(&self) -> impl Iterator<Item = &T> {
        self.sources.iter().filter_map(VecDeque::front)
    }

    /// Takes up to `n` items, one from each source that holds some in turn,
    /// starting with the source whose turn it is.
    pub fn take(&mut self, n: usize) -> Vec<T> {
        let n = n.min(self.len);
        let mut taken = Vec::with_capacity(n);
        let count = self.sources.len();
        while taken.len() < n {
            let source = &mut self.sources[self.turn];
            self.turn = (self.turn + 1) % count;
            if let Some(item) = source.pop_front() {
                taken.push(item);
            }
        }
        self.len -= n;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(counts: &[usize]) -> FairQueue<(usize, usize)> {
        let mut q = FairQueue::new(counts.len());
        for (source, &count) in counts.iter().enumerate() {
            for i in 0..count {
                q.push(source, (source, i));
            }
        }
        q
    }

    #[test]
    fn busy_sources_share_each_batch_equally_and_a_quiet_one_gets_its_turn() {
        // A backlog of 60,000 in source 0; one job in each of 1..=20.
        let mut counts = vec![60_000];
        counts.extend(std::iter::repeat_n(1, 20));
        let mut q = queue(&counts);
        let batch = q.take(250);
        let quiet: Vec<_> = batch.iter().filter(|(s, _)| *s != 0).collect();
        assert_eq!(quiet.len(), 20, "every quiet source in the first batch");
        assert_eq!(batch.len(), 250);
        assert_eq!(q.len(), 60_000 + 20 - 250);
    }

    #[test]
    fn k_busy_sources_get_a_kth_each() {
        let mut q = queue(&[1000, 1000, 1000, 1000, 0, 0]);
        let mut share = [0usize; 6];
        for _ in 0..10 {
            for (source, _) in q.take(250) {
                share[source] += 1;
            }
        }
        for busy in &share[..4] {
            assert!((624..=626).contains(busy), "{share:?}");
        }
        assert_eq!(share[4] + share[5], 0);
    }

    #[test]
    fn each_source_is_taken_in_the_order_it_came() {
        let mut q = queue(&[7, 3, 5]);
        let mut last = [None::<usize>; 3];
        while !q.is_empty() {
            for (source, i) in q.take(4) {
                assert!(
                    last[source].is_none_or(|l| l + 1 == i),
                    "{source}: {i} after {last:?}"
                );
                last[source] = Some(i);
            }
        }
        assert_eq!(last, [Some(6), Some(2), Some(4)]);
    }

    #[test]
    fn the_turn_carries_over_between_batches() {
        let mut q = queue(&[3, 3, 3]);
        let sources =
            |batch: Vec<(usize, usize)>| batch.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(sources(q.take(2)), [0, 1]);
        assert_eq!(sources(q.take(2)), [2, 0]);
        assert_eq!(sources(q.take(5)), [1, 2, 0, 1, 2]);
        assert!(q.take(5).is_empty());
    }

    #[test]
    fn heads_are_the_oldest_of_each_source() {
        let q = queue(&[2, 0, 1]);
        assert_eq!(q.heads().copied().collect::<Vec<_>>(), [(0, 0), (2, 0)]);
    }
}
