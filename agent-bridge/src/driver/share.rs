//! A tunnel's share of the bridge's memory budget, as its driver keeps it: the session's
//! [`Lease`], the credit its local connections are read on, and the wait for the pool when the
//! lease cannot grow. The driver settles the share once per loop turn against what the tunnel
//! holds (the session's buffers, and what its connections have not written out), and tells the
//! session how much more it may receive.
//!
//! Reads never wait for the pool: they take a credit of [`READ_CREDIT`] bytes that the
//! session's floor keeps for them. A read's credit comes back once the lease covers what was
//! read; while the pool has no room for it, the credit stays spent, and the connections are
//! not read.

use futures::future::BoxFuture;

use crate::budget::{Held, Lease, READ_CREDIT};
use crate::protocol::config::INBOUND_HEADROOM;

pub(super) struct Share {
    lease: Lease,
    /// Bytes read on the credit that the lease does not cover yet.
    credit_spent: usize,
    /// The pool's answer to a lease that could not grow, while the driver waits for it.
    wait: Option<BoxFuture<'static, Option<Held>>>,
}

impl Share {
    pub(super) fn new(lease: Lease) -> Self {
        Self {
            lease,
            credit_spent: 0,
            wait: None,
        }
    }

    /// Bytes the connections may read now.
    pub(super) fn read_credit(&self) -> usize {
        READ_CREDIT - self.credit_spent
    }

    /// `bytes` were read: their credit comes back at the next settle that covers them.
    pub(super) fn took_read(&mut self, bytes: usize) {
        self.credit_spent = (self.credit_spent + bytes).min(READ_CREDIT);
    }

    /// Settles the lease against `held` (everything the tunnel holds): covers that, the read
    /// credit and one more message, from the pool if it has room now and otherwise by waiting
    /// for it ([`Share::room`]). Returns the bytes the session may still receive.
    pub(super) fn settle(&mut self, held: usize) -> usize {
        // Reads the lease covers give their credit back.
        if self.credit_spent > 0 && self.lease.cover(held + READ_CREDIT + INBOUND_HEADROOM) {
            self.credit_spent = 0;
        }
        // Bytes read on spent credit are covered by that credit.
        let charged = held - self.credit_spent.min(held) + READ_CREDIT;
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

    /// Resolves when the pool gives the room the share waits for; pending for ever when the
    /// share does not wait. (What the tunnel writes out also makes room: the driver settles
    /// again after every write.)
    pub(super) async fn room(&mut self) {
        let Some(wait) = &mut self.wait else {
            return std::future::pending().await;
        };
        let permit = wait.await;
        self.wait = None;
        if let Some(permit) = permit {
            self.lease.absorb_permit(permit);
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
    fn the_floor_alone_leaves_room_for_one_message_beside_the_read_credit() {
        let budget = MemoryBudget::new(SESSION_FLOOR);
        let mut share = Share::new(budget.lease().unwrap());
        // Nothing held: the room is the floor less the read credit.
        let room = share.settle(0);
        assert!(room >= INBOUND_HEADROOM, "{room}");
        assert!(!share.is_waiting());
        assert_eq!(share.read_credit(), READ_CREDIT);
        // A few bytes of its own (a handshake response) still leave a message's room.
        assert!(share.settle(300) >= INBOUND_HEADROOM);
        assert_eq!(budget.overdrawn(), 0);
    }

    #[test]
    fn a_read_keeps_its_credit_spent_until_the_lease_covers_it() {
        let budget = MemoryBudget::new(SESSION_FLOOR + 8 * KIB);
        let mut share = Share::new(budget.lease().unwrap());
        let hog = budget.lease();
        assert!(hog.is_none(), "the pool holds less than another floor");
        // A connection reads all the credit; the bytes are held now (pending, then
        // unacknowledged). The pool cannot cover them beside the credit, so it stays spent.
        share.took_read(READ_CREDIT);
        share.settle(READ_CREDIT);
        assert_eq!(share.read_credit(), 0);
        assert_eq!(budget.overdrawn(), 0);
        // Acknowledged: nothing held, the credit comes back.
        share.settle(0);
        assert_eq!(share.read_credit(), READ_CREDIT);
        assert_eq!(budget.overdrawn(), 0);
    }

    #[tokio::test]
    async fn a_share_that_cannot_grow_waits_for_the_pool() {
        let budget = MemoryBudget::new(2 * SESSION_FLOOR);
        let mut share = Share::new(budget.lease().unwrap());
        let other = budget.lease().unwrap();
        // 60 KiB not yet written out: not enough room left for another message.
        let room = share.settle(60 * KIB);
        assert!(room < INBOUND_HEADROOM, "{room}");
        assert!(share.is_waiting());
        assert_eq!(budget.waits(), 1);
        assert!(share.room().now_or_never().is_none(), "nothing changed");
        // Another session ends: the pool has room again.
        drop(other);
        share.room().await;
        assert!(share.settle(60 * KIB) >= INBOUND_HEADROOM);
        assert!(!share.is_waiting());
        assert_eq!(budget.overdrawn(), 0);
    }

    #[test]
    fn written_out_bytes_make_room_without_the_pool() {
        let budget = MemoryBudget::new(SESSION_FLOOR);
        let mut share = Share::new(budget.lease().unwrap());
        assert!(share.settle(60 * KIB) < INBOUND_HEADROOM);
        assert!(share.is_waiting());
        // The connection took what it held: the next settle needs nothing more.
        assert!(share.settle(0) >= INBOUND_HEADROOM);
        assert!(!share.is_waiting());
        assert_eq!(budget.overdrawn(), 0);
    }
}
