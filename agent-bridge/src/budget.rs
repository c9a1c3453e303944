//! The bridge's memory budget: one pool of bytes that every session's buffers draw from, so that
//! what the bridge holds for its clients stays bounded whatever they do (a thousand clients that
//! read slowly, a thousand that upload to an agent that does not acknowledge).
//!
//! ```text
//!   MemoryBudget (a pool of bytes)
//!     └─ Lease, one per session, held by its driver; it covers:
//!          received and not yet written out to the client, sent and not yet acknowledged,
//!          room for one more message, and what the session's local readers may hold
//! ```
//!
//! A tenant (the sessions of one client namespace) may hold at most its share of the pool
//! ([`MemoryBudget::with_tenant_limit`]): its leases draw from a pool of its own as well, so
//! that one tenant's clients that do not read cannot spend what other tenants' sessions need.
//!
//! Nothing is dropped for want of budget: a session that cannot grow its lease stops reading
//! its WebSocket (the agent is held back by the transport, as with the per-session bounds), and
//! its local readers stop reading. Each session keeps a floor for its whole life, taken at
//! admission, so no admitted session ever stalls for what other sessions hold; a connection
//! whose floor the pool cannot give is refused. A lease grows and shrinks in steps, so a busy
//! session does not touch the pool for every message.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus::{
    IntCounter, IntGauge, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::protocol::config::INBOUND_HEADROOM;

/// The default budget of `serve`: half the shipped pod limit (512 MiB), which leaves the other
/// half for a thousand idle sessions (about 40 KiB each), the runtime and the allocator's slack.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// What each session holds of the budget for its whole life: room for one more message, what
/// its local readers may hold ([`READ_CREDIT`]), and room for the bytes of its own that no read
/// brought (its handshake response, smux headers, acks). With it a session can always read the
/// acks that free what it sent, and the messages its client waits for.
pub const SESSION_FLOOR: usize = INBOUND_HEADROOM + READ_CREDIT + CONTROL_ROOM;

/// What a session's local readers may hold together (read and not yet taken by the session):
/// one read of an smux frame's worth.
pub const READ_CREDIT: usize = 32 * 1024;

/// See [`SESSION_FLOOR`]: far more than a session's own control bytes ever come to.
const CONTROL_ROOM: usize = 16 * 1024;

/// A lease grows by this much more than it needs, and gives back what it holds more than
/// twice this above its need: a busy session touches the pool once per step, not per message,
/// and a thousand sessions hold at most a few tens of MiB they do not use.
pub const LEASE_STEP: usize = 16 * 1024;

/// One pool of bytes shared by every session of a bridge. Cheap to clone (one pool).
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    pool: Arc<Semaphore>,
    limit: usize,
    waits: Arc<AtomicU64>,
    overdrawn: Arc<AtomicU64>,
    /// Each tenant's pool, when tenants are limited.
    tenants: Option<Arc<Tenants>>,
}

/// What the sessions of one tenant may hold together, and each tenant's pool of it: made when
/// its first lease is, and dropped once nothing holds it (no lease, permit or wait: a new pool
/// would be the same, full), so the map follows the namespaces served now, not all ever served.
#[derive(Debug)]
struct Tenants {
    limit: usize,
    pools: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Tenants {
    fn pool(&self, tenant: &str) -> Arc<Semaphore> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        // Leases, their permits and their waits each hold the pool: the map's is the last.
        pools.retain(|_, pool| Arc::strong_count(pool) > 1);
        (pools.entry(tenant.to_owned()))
            .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
            .clone()
    }

    #[cfg(test)]
    fn kept(&self) -> Vec<String> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept: Vec<String> = pools.keys().cloned().collect();
        kept.sort();
        kept
    }
}

/// Which pool had no room for a new lease's floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    /// The bridge's.
    Bridge,
    /// The tenant's.
    Tenant,
}

impl MemoryBudget {
    /// A pool of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Self {
            pool: Arc::new(Semaphore::new(limit)),
            limit,
            waits: Arc::default(),
            overdrawn: Arc::default(),
            tenants: None,
        }
    }

    /// The same pool, where the leases of one tenant ([`MemoryBudget::lease_for`]) hold at
    /// most `limit` bytes together.
    pub fn with_tenant_limit(mut self, limit: usize) -> Self {
        self.tenants = Some(Arc::new(Tenants {
            limit: limit.min(self.limit),
            pools: Mutex::default(),
        }));
        self
    }

    /// The pool's size.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// What one tenant's leases may hold together, when tenants are limited.
    pub fn tenant_limit(&self) -> Option<usize> {
        self.tenants.as_ref().map(|t| t.limit)
    }

    /// Bytes held by leases now.
    pub fn in_use(&self) -> usize {
        self.limit.saturating_sub(self.pool.available_permits())
    }

    /// Times a session waited for the pool.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn count_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Times a session was found holding more than its lease (a driver's accounting missed
    /// something); zero when the budget bounds what the bridge holds.
    pub fn overdrawn(&self) -> u64 {
        self.overdrawn.load(Ordering::Relaxed)
    }

    pub(crate) fn count_overdrawn(&self) {
        self.overdrawn.fetch_add(1, Ordering::Relaxed);
    }

    /// A new session's lease, holding its [`SESSION_FLOOR`]; `None` when the pool cannot give
    /// the floor now (the connection is refused).
    pub fn lease(&self) -> Option<Lease> {
        self.lease_for(None).ok()
    }

    /// A new session's lease for `tenant` (none: counted in the bridge's pool only), holding
    /// its [`SESSION_FLOOR`]; or which pool cannot give the floor now.
    pub fn lease_for(&self, tenant: Option<&str>) -> Result<Lease, Spent> {
        let tenant = match (&self.tenants, tenant) {
            (Some(tenants), Some(tenant)) => Some(tenants.pool(tenant)),
            _ => None,
        };
        let held = take(&self.pool, tenant.as_ref(), SESSION_FLOOR)?;
        Ok(Lease {
            budget: self.clone(),
            held,
            tenant,
        })
    }

    /// Exports the budget's size, use, waits and overdrafts on `registry`, read at each scrape.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(BudgetCollector::new(self.clone())?))
    }
}

/// `bytes` for people: whole MiB, or KiB.
pub fn in_units(bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Bytes taken from the bridge's pool, and as many from the tenant's when there is one.
#[derive(Debug)]
pub struct Held {
    pool: OwnedSemaphorePermit,
    tenant: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn bytes(&self) -> usize {
        self.pool.num_permits()
    }

    /// Adds `more`, taken for the same lease (so from the same pools).
    fn merge(&mut self, more: Held) {
        self.pool.merge(more.pool);
        if let (Some(tenant), Some(more)) = (&mut self.tenant, more.tenant) {
            tenant.merge(more);
        }
    }

    /// Gives `bytes` back to both pools.
    fn give_back(&mut self, bytes: usize) {
        drop(self.pool.split(bytes));
        if let Some(tenant) = &mut self.tenant {
            drop(tenant.split(bytes));
        }
    }
}

/// Takes `bytes` from `tenant`'s pool (if any) and the bridge's `pool`, if both have room now;
/// nothing otherwise.
fn take(
    pool: &Arc<Semaphore>,
    tenant: Option<&Arc<Semaphore>>,
    bytes: usize,
) -> Result<Held, Spent> {
    let tenant = match tenant {
        Some(tenant) => Some(
            (tenant.clone().try_acquire_many_owned(permits(bytes))).map_err(|_| Spent::Tenant)?,
        ),
        None => None,
    };
    let pool = (pool.clone().try_acquire_many_owned(permits(bytes))).map_err(|_| Spent::Bridge)?;
    Ok(Held { pool, tenant })
}

/// One session's share of the budget, held by its driver: it covers what the session holds,
/// plus room to read one more message.
#[derive(Debug)]
pub struct Lease {
    budget: MemoryBudget,
    held: Held,
    /// The pool of the session's tenant, if tenants are limited.
    tenant: Option<Arc<Semaphore>>,
}

impl Lease {
    /// The pool it draws from.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held.bytes()
    }

    /// Holds at least `need`, and at most two [`LEASE_STEP`]s more: grows by a step from the
    /// pool when it has room now, and gives back what is more than two steps above (never
    /// the floor). False when the pool cannot cover `need` now (nothing is taken then).
    pub fn cover(&mut self, need: usize) -> bool {
        let held = self.held();
        if held < need {
            return self.grow_to(need + LEASE_STEP) || self.grow_to(need);
        }
        let keep = (need + LEASE_STEP).max(SESSION_FLOOR);
        if held > need + 2 * LEASE_STEP && held > keep {
            self.held.give_back(held - keep);
        }
        true
    }

    fn grow_to(&mut self, bytes: usize) -> bool {
        let more = bytes.saturating_sub(self.held());
        match take(&self.budget.pool, self.tenant.as_ref(), more) {
            Ok(more) => {
                self.held.merge(more);
                true
            }
            Err(_) => false,
        }
    }

    /// Resolves once the tenant's pool, then the bridge's, give `more` bytes (to
    /// [`Lease::absorb_permit`]); counts a wait.
    pub fn wait_for(&self, more: usize) -> impl Future<Output = Option<Held>> + Send + 'static {
        self.budget.count_wait();
        let (pool, tenant) = (self.budget.pool.clone(), self.tenant.clone());
        async move {
            let tenant = match tenant {
                Some(tenant) => Some(tenant.acquire_many_owned(permits(more)).await.ok()?),
                None => None,
            };
            let pool = pool.acquire_many_owned(permits(more)).await.ok()?;
            Some(Held { pool, tenant })
        }
    }

    /// Adds what [`Lease::wait_for`] got.
    pub fn absorb_permit(&mut self, more: Held) {
        self.held.merge(more);
    }
}

/// Exports the budget at scrape time: its size and use are read then, not kept up to date on
/// every message.
struct BudgetCollector {
    budget: MemoryBudget,
    limit: IntGauge,
    in_use: IntGauge,
    waits: IntCounter,
    overdrawn: IntCounter,
    descs: Vec<Desc>,
}

impl BudgetCollector {
    fn new(budget: MemoryBudget) -> prometheus::Result<Self> {
        let limit = IntGauge::with_opts(Opts::new(
            "agent_bridge_memory_budget_bytes",
            "The memory budget: bytes all sessions' buffers may hold together.",
        ))?;
        let in_use = IntGauge::with_opts(Opts::new(
            "agent_bridge_memory_budget_in_use_bytes",
            "Bytes of the memory budget held now by sessions.",
        ))?;
        let waits = IntCounter::with_opts(Opts::new(
            "agent_bridge_memory_budget_waits_total",
            "Times a session found the memory budget spent and waited, reading nothing, until bytes were freed.",
        ))?;
        let overdrawn = IntCounter::with_opts(Opts::new(
            "agent_bridge_memory_budget_overdrawn_total",
            "Times a session was found holding more than its share of the memory budget (always 0 unless the bridge's accounting is wrong).",
        ))?;
        let descs = [limit.desc(), in_use.desc(), waits.desc(), overdrawn.desc()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        Ok(Self {
            budget,
            limit,
            in_use,
            waits,
            overdrawn,
            descs,
        })
    }
}

impl Collector for BudgetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let gauge = |bytes: usize| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.limit.set(gauge(self.budget.limit()));
        self.in_use.set(gauge(self.budget.in_use()));
        // The counters only ever catch up with the budget's own counts.
        let catch_up = |counter: &IntCounter, count: u64| {
            counter.inc_by(count.saturating_sub(counter.get()));
        };
        catch_up(&self.waits, self.budget.waits());
        catch_up(&self.overdrawn, self.budget.overdrawn());
        [
            self.limit.collect(),
            self.in_use.collect(),
            self.waits.collect(),
            self.overdrawn.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    const KIB: usize = 1024;

    #[test]
    fn a_lease_holds_its_floor_and_the_pool_refuses_one_it_cannot_give() {
        let budget = MemoryBudget::new(2 * SESSION_FLOOR + KIB);
        let a = budget.lease().expect("room for a floor");
        let _b = budget.lease().expect("room for a second floor");
        assert_eq!(a.held(), SESSION_FLOOR);
        assert_eq!(budget.in_use(), 2 * SESSION_FLOOR);
        assert!(budget.lease().is_none(), "no room for a third floor");
        drop(a);
        assert_eq!(budget.in_use(), SESSION_FLOOR);
        assert!(budget.lease().is_some());
    }

    #[test]
    fn a_lease_grows_by_steps_and_gives_back_what_is_well_above_its_need() {
        let budget = MemoryBudget::new(SESSION_FLOOR + 64 * KIB);
        let mut lease = budget.lease().unwrap();
        // Within the floor: nothing taken.
        assert!(lease.cover(SESSION_FLOOR - KIB));
        assert_eq!(lease.held(), SESSION_FLOOR);
        // Above it: a step more than needed.
        assert!(lease.cover(SESSION_FLOOR + KIB));
        assert_eq!(lease.held(), SESSION_FLOOR + KIB + LEASE_STEP);
        // Within two steps above the need: kept.
        assert!(lease.cover(SESSION_FLOOR + KIB));
        assert_eq!(lease.held(), SESSION_FLOOR + KIB + LEASE_STEP);
        // Near the pool's end only the need itself is taken.
        assert!(lease.cover(SESSION_FLOOR + 60 * KIB));
        assert_eq!(lease.held(), SESSION_FLOOR + 60 * KIB);
        assert!(!lease.cover(SESSION_FLOOR + 65 * KIB), "more than the pool");
        assert_eq!(
            lease.held(),
            SESSION_FLOOR + 60 * KIB,
            "a failed cover takes nothing"
        );
        // Well above the need: back to a step above it, never below the floor.
        assert!(lease.cover(SESSION_FLOOR + 10 * KIB));
        assert_eq!(lease.held(), SESSION_FLOOR + 10 * KIB + LEASE_STEP);
        assert!(lease.cover(0));
        assert_eq!(lease.held(), SESSION_FLOOR);
        assert_eq!(budget.in_use(), SESSION_FLOOR);
    }

    #[tokio::test]
    async fn a_lease_that_waits_gets_what_another_gives_back() {
        let budget = MemoryBudget::new(SESSION_FLOOR * 3 + LEASE_STEP);
        let mut full = budget.lease().unwrap();
        assert!(full.cover(2 * SESSION_FLOOR));
        let mut waiting = budget.lease().unwrap();
        assert!(!waiting.cover(2 * SESSION_FLOOR));
        let more = waiting.wait_for(SESSION_FLOOR);
        futures::pin_mut!(more);
        assert!((&mut more).now_or_never().is_none());
        assert!(full.cover(0));
        waiting.absorb_permit(more.await.expect("the pool is never closed"));
        assert_eq!(waiting.held(), 2 * SESSION_FLOOR);
        assert_eq!(budget.waits(), 1);
    }

    /// One tenant's leases hold at most its limit together, whatever its sessions need, and
    /// leave the rest of the pool to other tenants: a lease of theirs gets its floor and grows.
    #[tokio::test]
    async fn a_tenant_holds_at_most_its_limit_and_leaves_the_rest_to_others() {
        let budget = MemoryBudget::new(8 * SESSION_FLOOR).with_tenant_limit(3 * SESSION_FLOOR);
        assert_eq!(budget.tenant_limit(), Some(3 * SESSION_FLOOR));
        let mut busy = budget.lease_for(Some("busy")).expect("a floor");
        assert!(busy.cover(2 * SESSION_FLOOR - LEASE_STEP));
        assert_eq!(busy.held(), 2 * SESSION_FLOOR);
        let mut second = budget.lease_for(Some("busy")).expect("the third floor");
        assert_eq!(
            budget.lease_for(Some("busy")).err(),
            Some(Spent::Tenant),
            "no fourth floor for the tenant"
        );
        assert!(
            !busy.cover(3 * SESSION_FLOOR),
            "nor more for one of its leases"
        );
        assert_eq!(
            budget.in_use(),
            3 * SESSION_FLOOR,
            "a failed grow takes nothing"
        );

        // Another tenant, and a session of no tenant, get floors and grow in what is left.
        let mut quiet = budget
            .lease_for(Some("quiet"))
            .expect("another tenant's floor");
        assert!(quiet.cover(3 * SESSION_FLOOR - LEASE_STEP));
        let _untenanted = budget
            .lease_for(None)
            .expect("a floor of the bridge's pool");

        // A wait of the busy tenant's ends when the tenant gives back, not before.
        let more = second.wait_for(SESSION_FLOOR);
        futures::pin_mut!(more);
        assert!((&mut more).now_or_never().is_none());
        assert!(
            quiet.cover(0),
            "another tenant's bytes are not the busy one's"
        );
        assert!((&mut more).now_or_never().is_none());
        assert!(busy.cover(0));
        second.absorb_permit(more.await.expect("the pools are never closed"));
        assert_eq!(second.held(), 2 * SESSION_FLOOR);
        drop((busy, second));
        assert!(budget.lease_for(Some("busy")).is_ok(), "all given back");
    }

    /// A tenant's pool goes once nothing holds it, so the bridge keeps pools for the
    /// namespaces it serves now, not for every one it ever served.
    #[test]
    fn a_tenants_pool_goes_once_nothing_holds_it() {
        let budget = MemoryBudget::new(8 * SESSION_FLOOR).with_tenant_limit(3 * SESSION_FLOOR);
        let kept = || budget.tenants.as_ref().expect("tenants").kept();
        let gone = budget.lease_for(Some("gone")).expect("a floor");
        let mut stays = budget.lease_for(Some("stays")).expect("a floor");
        drop(gone);
        let _third = budget.lease_for(Some("third")).expect("a floor");
        assert_eq!(kept(), ["stays", "third"]);
        // A pool held by a lease keeps counting what its leases hold.
        assert!(stays.cover(2 * SESSION_FLOOR - LEASE_STEP));
        let _second = budget.lease_for(Some("stays")).expect("the third floor");
        assert_eq!(budget.lease_for(Some("stays")).err(), Some(Spent::Tenant));
    }

    #[test]
    fn the_collector_reads_the_budget_at_scrape_time() {
        let budget = MemoryBudget::new(4 * SESSION_FLOOR);
        let registry = prometheus::Registry::new();
        budget.register(&registry).unwrap();
        let _lease = budget.lease().unwrap();
        let text = crate::metrics::encode(&registry);
        assert!(text.contains(&format!(
            "agent_bridge_memory_budget_bytes {}",
            4 * SESSION_FLOOR
        )));
        assert!(text.contains(&format!(
            "agent_bridge_memory_budget_in_use_bytes {SESSION_FLOOR}"
        )));
        assert!(text.contains("agent_bridge_memory_budget_waits_total 0"));
    }
}
