//! One lock per plugin name: every lifecycle operation on a plugin (load, replace, unload,
//! purge, resume, dead-letter retry and delete) runs alone for that name, from the stop of
//! the old runner to the last side effect, while operations on other plugins and status
//! reads go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The per-name locks; an entry lives only while someone holds or waits for it.
#[derive(Default)]
pub(super) struct NameLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held for the whole of one operation on one plugin name.
pub(super) struct NameGuard<'a> {
    locks: &'a NameLocks,
    name: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl NameLocks {
    /// Waits until no other operation holds `name`, then holds it.
    pub(super) async fn lock(&self, name: &str) -> NameGuard<'_> {
        let lock = self
            .locks
            .lock()
            .expect("name locks")
            .entry(name.to_owned())
            .or_default()
            .clone();
        // A caller that gives up waiting leaves the entry behind until the next guard of
        // the name is dropped (the registry runs its operations as tasks, which never give
        // up).
        let guard = lock.lock_owned().await;
        NameGuard {
            locks: self,
            name: name.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.locks.locks.lock().expect("name locks");
        drop(self.guard.take());
        // Only the map's reference left: nobody holds or waits for this name.
        if locks
            .get(&self.name)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_name_and_entries_go_away() {
        let locks = Arc::new(NameLocks::default());
        let a = locks.lock("a").await;
        // Another name is free.
        drop(locks.lock("b").await);
        // The same name waits.
        let l = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l.lock("a").await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(locks.locks.lock().unwrap().is_empty());
    }
}
