//! Exponential backoff, for a plugin's retries and for the host's own storage failures.

use std::time::Duration;

/// First and longest wait before retrying after the host's own storage failed.
pub(super) const HOST_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(30));

/// Exponential backoff: each wait twice the last, up to a ceiling.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits starting at `first`, never longer than `max`.
    pub(super) fn new((first, max): (Duration, Duration)) -> Self {
        Self { next: first, max }
    }

    /// The wait before the next try.
    pub(super) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wait_doubles_up_to_the_ceiling() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new((ms(100), ms(350)));
        let waits: Vec<_> = (0..5).map(|_| b.next()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(350), ms(350), ms(350)]);
    }
}
