//! The one place that knows `backoff`: exponential delays with jitter, and
//! one helper that retries an async call while its error says retrying can
//! help. Every loop that waits for a dependency goes through here.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;

/// The longest wait between two tries.
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Delays between tries: from 100 ms, growing to [`MAX_DELAY`], with
/// jitter, never giving up on its own.
pub struct Backoff(ExponentialBackoff);

impl Backoff {
    pub fn new() -> Self {
        Backoff(
            backoff::ExponentialBackoffBuilder::new()
                .with_initial_interval(Duration::from_millis(100))
                .with_max_interval(MAX_DELAY)
                .with_max_elapsed_time(None)
                .build(),
        )
    }

    /// How long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next_backoff().unwrap_or(MAX_DELAY)
    }

    /// Starts over from the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Calls `attempt` until it succeeds, sleeping with [`Backoff`] between
/// tries. After each failure `retry` is told the error and the delay about
/// to be slept (to log and count it) and answers whether to try again; when
/// it answers no, the error is returned.
///
/// # Errors
/// The first error `retry` declines to retry.
pub async fn until_ok<T, E, F>(
    mut attempt: impl FnMut() -> F,
    mut retry: impl FnMut(&E, Duration) -> bool,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                let delay = backoff.next_delay();
                if !retry(&err, delay) {
                    return Err(err);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_is_retried_until_it_succeeds_or_is_declined() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let result: Result<u32, &str> = until_ok(
            || async {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if n < 3 { Err("down") } else { Ok(n) }
            },
            |_, delay| delay <= MAX_DELAY,
        )
        .await;
        assert_eq!(result, Ok(3));

        let mut tries = 0;
        let result: Result<(), &str> = until_ok(
            || async { Err("bad input") },
            |_, _| {
                tries += 1;
                tries < 2
            },
        )
        .await;
        assert_eq!((result, tries), (Err("bad input"), 2));
    }
}
