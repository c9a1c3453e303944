//! Syncs that many reconciles ask for at once, run one at a time per key and shared: a request
//! is answered by the first sync that starts after it was made, so that requests arriving while
//! a sync runs share the next one. A sync must read what it syncs after it starts (never from
//! a snapshot taken before), which is what makes a later sync answer for every earlier request.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
};

use crate::{Error, Result};

/// What a sync gave, shared by every request it answers.
pub type Shared<T> = std::result::Result<Arc<T>, Arc<Error>>;

/// One key's syncs: how many were requested, and the last outcome with the number of requests
/// it answers.
struct Slot<T> {
    requested: AtomicU64,
    last: tokio::sync::Mutex<(u64, Option<Shared<T>>)>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            requested: AtomicU64::new(0),
            last: tokio::sync::Mutex::new((0, None)),
        }
    }
}

/// Coalesced syncs by key.
pub struct Coalesced<K, T> {
    slots: Mutex<HashMap<K, Arc<Slot<T>>>>,
}

impl<K, T> Default for Coalesced<K, T> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Clone + Eq + Hash, T> Coalesced<K, T> {
    /// Runs `sync` for `key` unless a sync that started after this request has already
    /// finished, whose outcome is then this request's too.
    pub async fn run<F, Fut>(&self, key: &K, sync: F) -> Shared<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let ticket = slot.requested.fetch_add(1, SeqCst) + 1;
        let mut last = slot.last.lock().await;
        if let (answered, Some(outcome)) = &*last
            && *answered >= ticket
        {
            return outcome.clone();
        }
        // Every request made so far is answered by a sync that starts now.
        let answers = slot.requested.load(SeqCst);
        let outcome = sync().await.map(Arc::new).map_err(Arc::new);
        *last = (answers, Some(outcome.clone()));
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn requests_made_while_a_sync_runs_share_the_next_one() {
        let coalesced: Arc<Coalesced<&str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        // The first sync holds until the others have asked.
        let first = {
            let (coalesced, runs) = (coalesced.clone(), runs.clone());
            tokio::spawn(async move {
                coalesced
                    .run(&"role", || async move {
                        let _ = held.await;
                        Ok(runs.fetch_add(1, SeqCst) + 1)
                    })
                    .await
            })
        };
        while coalesced
            .slots
            .lock()
            .unwrap()
            .get("role")
            .map(|s| s.requested.load(SeqCst))
            != Some(1)
        {
            tokio::task::yield_now().await;
        }
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let (coalesced, runs) = (coalesced.clone(), runs.clone());
                tokio::spawn(async move {
                    coalesced
                        .run(&"role", || async move { Ok(runs.fetch_add(1, SeqCst) + 1) })
                        .await
                })
            })
            .collect();
        while coalesced.slots.lock().unwrap()["role"]
            .requested
            .load(SeqCst)
            != 11
        {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(*first.await.unwrap().unwrap(), 1);
        for request in waiting {
            assert_eq!(
                *request.await.unwrap().unwrap(),
                2,
                "one more sync for all ten"
            );
        }
        assert_eq!(runs.load(SeqCst), 2);
        // A later request runs again: nothing since answers it.
        let again = coalesced
            .run(&"role", || async { Ok(runs.fetch_add(1, SeqCst) + 1) })
            .await;
        assert_eq!(*again.unwrap(), 3);
    }
}
