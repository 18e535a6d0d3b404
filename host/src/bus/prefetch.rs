//! A subscription's next catch-up read, started while its consumer handles the batch it
//! was given: reading the log (a page's decode on a blocking thread) and handling a batch
//! (a plugin's call) then run on two cores instead of taking turns on one.

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::event::Event;
use crate::limits::stored_bytes;
use crate::log::{EventLog, LogError, ReadFilter, ReadPage};

/// Events read from the log, each with its stored size, and where the next read starts.
pub(super) struct Page {
    pub(super) events: Vec<(Arc<Event>, usize)>,
    pub(super) next: u64,
}

impl From<ReadPage> for Page {
    fn from(page: ReadPage) -> Self {
        let events = page
            .events
            .into_iter()
            .map(|e| {
                let size = stored_bytes(&e);
                (Arc::new(e), size)
            })
            .collect();
        Self {
            events,
            next: page.next,
        }
    }
}

/// A read from one position, running on its own task; aborted when dropped unused.
pub(super) struct Prefetch {
    from: u64,
    task: JoinHandle<Result<Page, LogError>>,
}

impl Prefetch {
    /// Starts reading up to `want` events from `from`; `None` outside a tokio runtime.
    pub(super) fn start(
        log: Arc<dyn EventLog>,
        from: u64,
        want: usize,
        filter: ReadFilter,
    ) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let task =
            runtime.spawn(async move { log.read(from, want, &filter).await.map(Page::from) });
        Some(Self { from, task })
    }

    /// The position the read started at: it is of use only to a reader still there.
    pub(super) fn from(&self) -> u64 {
        self.from
    }

    /// Waits for the read. Cancel-safe: a caller that stops waiting can wait again.
    pub(super) async fn page(&mut self) -> Result<Page, LogError> {
        (&mut self.task)
            .await
            .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
