//! A tunnel's share of the bridge's memory budget, as its driver keeps it: the session's
//! [`Lease`], the credit its local readers read on, what its local writers have been handed and
//! not yet written, and the wait for the pool when the lease cannot grow. The driver settles
//! the share once per loop turn against what the session holds, and tells the session how much
//! more it may receive.
//!
//! Local readers never wait for the pool: they read on a credit of [`READ_CREDIT`] bytes that
//! the session's floor keeps for them. A read's credit comes back to them once the lease covers
//! what was read; while the pool has no room for it, the driver keeps the credit, and the
//! readers stop.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use futures::future::BoxFuture;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::budget::{Lease, READ_CREDIT};
use crate::protocol::config::INBOUND_HEADROOM;

/// Bytes handed to a tunnel's local writers and not yet written out; writers tell the driver
/// when they write some, in case it waits for room.
#[derive(Debug, Default)]
pub(super) struct Unwritten {
    bytes: AtomicUsize,
    written: Notify,
}

impl Unwritten {
    pub(super) fn handed(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn written(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.written.notify_one();
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

pub(super) struct Share {
    lease: Lease,
    /// What local readers read on: [`READ_CREDIT`] bytes of the lease's floor.
    pub(super) read_credit: Arc<Semaphore>,
    /// Credit of reads taken whose bytes the lease does not cover yet.
    kept_credit: Option<OwnedSemaphorePermit>,
    pub(super) unwritten: Arc<Unwritten>,
    /// The pool's answer to a lease that could not grow, while the driver waits for it.
    wait: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>>,
}

impl Share {
    pub(super) fn new(lease: Lease) -> Self {
        Self {
            lease,
            read_credit: Arc::new(Semaphore::new(READ_CREDIT)),
            kept_credit: None,
            unwritten: Arc::default(),
            wait: None,
        }
    }

    /// The driver took a read: its credit goes back to the readers at the next settle that
    /// covers the bytes.
    pub(super) fn took_read(&mut self, credit: Option<OwnedSemaphorePermit>) {
        match (&mut self.kept_credit, credit) {
            (Some(kept), Some(credit)) => kept.merge(credit),
            (kept, credit) => *kept = kept.take().or(credit),
        }
    }

    /// Settles the lease against `held` (what the tunnel holds outside its writers and
    /// readers): covers that, the readers' credit and one more message, from the pool if it
    /// has room now and otherwise by waiting for it ([`Share::room`]). Returns the bytes the
    /// session may still receive.
    pub(super) fn settle(&mut self, held: usize) -> usize {
        let held = held + self.unwritten.bytes();
        // Reads the lease covers give their credit back to the readers.
        if self.kept_credit.is_some() && self.lease.cover(held + READ_CREDIT + INBOUND_HEADROOM) {
            self.kept_credit = None;
        }
        // Bytes read on credit the driver keeps are covered by that credit.
        let kept = self.kept_credit.as_ref().map_or(0, |c| c.num_permits());
        let charged = held - kept.min(held) + READ_CREDIT;
        if charged > self.lease.held() {
            self.lease.budget().count_overdrawn();
        }
        if self.lease.cover(charged + INBOUND_HEADROOM) {
            self.wait = None;
        } else if self.wait.is_none() {
            let missing = charged + INBOUND_HEADROOM - self.lease.held();
            self.wait = Some(Box::pin(self.lease.wait_for(missing)));
        }
        self.lease.held().saturating_sub(charged)
    }

    /// Resolves when the wait for the pool ends: it gave room, or a writer wrote out some of
    /// what the tunnel holds (the next settle may then need nothing). Pending for ever when the
    /// share does not wait.
    pub(super) async fn room(&mut self) {
        let Some(wait) = &mut self.wait else {
            return std::future::pending().await;
        };
        tokio::select! {
            permit = wait => {
                self.wait = None;
                if let Some(permit) = permit {
                    self.lease.absorb_permit(permit);
                }
            }
            () = self.unwritten.written.notified() => {}
        }
    }

    pub(super) fn is_waiting(&self) -> bool {
        self.wait.is_some()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::budget::{MemoryBudget, SESSION_FLOOR};

    const KIB: usize = 1024;

    #[test]
    fn the_floor_alone_leaves_room_for_one_message_beside_the_readers_credit() {
        let budget = MemoryBudget::new(SESSION_FLOOR);
        let mut share = Share::new(budget.lease().unwrap());
        // Nothing held: the room is the floor less the readers' credit.
        let room = share.settle(0);
        assert!(room >= INBOUND_HEADROOM, "{room}");
        assert!(!share.is_waiting());
        // A few bytes of its own (a handshake response) still leave a message's room.
        assert!(share.settle(300) >= INBOUND_HEADROOM);
        assert_eq!(budget.overdrawn(), 0);
    }

    #[test]
    fn a_read_keeps_its_credit_until_the_lease_covers_it() {
        let budget = MemoryBudget::new(SESSION_FLOOR + 8 * KIB);
        let mut share = Share::new(budget.lease().unwrap());
        let hog = budget.lease();
        assert!(hog.is_none(), "the pool holds less than another floor");
        // A reader takes all its credit and reads; the driver takes the bytes.
        let credit = (share.read_credit.clone())
            .try_acquire_many_owned(READ_CREDIT as u32)
            .unwrap();
        share.took_read(Some(credit));
        // The bytes are held now (pending, then unacknowledged); the pool cannot cover them
        // beside the credit, so the credit stays with the driver and the readers wait.
        share.settle(READ_CREDIT);
        assert_eq!(share.read_credit.available_permits(), 0);
        assert_eq!(budget.overdrawn(), 0);
        // Acknowledged: nothing held, the credit goes back.
        share.settle(0);
        assert_eq!(share.read_credit.available_permits(), READ_CREDIT);
        assert_eq!(budget.overdrawn(), 0);
    }

    #[tokio::test]
    async fn a_share_that_cannot_grow_waits_until_its_writers_write_out() {
        let budget = MemoryBudget::new(SESSION_FLOOR);
        let mut share = Share::new(budget.lease().unwrap());
        // 60 KiB handed to the writers: not enough room left for another message.
        share.unwritten.handed(60 * KIB);
        let room = share.settle(0);
        assert!(room < INBOUND_HEADROOM, "{room}");
        assert!(share.is_waiting());
        assert_eq!(budget.waits(), 1);
        assert!(share.room().now_or_never().is_none(), "nothing changed");
        share.unwritten.written(60 * KIB);
        share.room().await;
        assert!(share.settle(0) >= INBOUND_HEADROOM);
        assert!(!share.is_waiting());
        assert_eq!(budget.overdrawn(), 0);
    }
}
