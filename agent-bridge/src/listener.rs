//! Endpoint listeners: exactly one per listen port (a Service's targetPort, unique across the
//! operator's Services), each accepting connections and carrying every one through its own SSM
//! session, within limits on concurrent sessions.
//!
//! ```text
//!  Services ──endpoints()──▶ desired set ──Listeners::apply──▶ one accept loop per endpoint
//!  per connection: a grant admits the client (client_policy) ─▶ limits (admission) ─▶ tunnel::carry
//! ```
//!
//! Removing an endpoint closes its listener and its tunnels; the rest are untouched. Shutdown
//! stops every accept loop first (draining), then, after a grace period, terminates what is left.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fleet_access_crds::bridge_contract::{self, EndpointAnnotations, EndpointPort, GrantPorts};
use k8s_openapi::jiff::Timestamp;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, info_span, warn};

pub use crate::admission::{Limits, Refusal, Share};
use crate::{
    admission::{Admission, Admitted},
    audit::{AuditSink, ByteCounts, ClientRecord, ConnectionRecord, Counted, Ended},
    client_policy::{ClientPolicies, Verdict},
    clients::{self, Client, PodDirectory},
    ssm::{ControlPlane, StartSessionRequest},
    tunnel::{Carried, Ending, SessionContext, carry},
};

/// One endpoint: where the bridge listens and what session it starts for each connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// The instance sessions go to.
    pub instance_id: String,
    /// The remote host the sessions forward to through the instance, if not the instance
    /// itself (the document pins it; kept for the logs).
    pub remote_host: Option<String>,
    /// The port on the instance, or on the remote host.
    pub port: u16,
    /// The port the bridge listens on.
    pub listen_port: u16,
    /// The session document.
    pub document: String,
    /// `portNumber` to pass, for documents that do not pin it.
    pub port_parameter: Option<u16>,
    /// The grants (`namespace/name`) that expose this port, as the Service records them.
    pub grants: Vec<String>,
}

impl Endpoint {
    /// The endpoint of one exposed port of a Service, exposed by `grants`.
    pub fn from_contract(
        service: &EndpointAnnotations,
        port: &EndpointPort,
        grants: &GrantPorts,
    ) -> Self {
        Self {
            instance_id: service.instance_id.clone(),
            remote_host: service.remote_host.clone(),
            port: port.port,
            listen_port: port.target_port,
            document: port.document.clone(),
            port_parameter: port.port_parameter,
            grants: (grants.iter())
                .filter(|(_, ports)| ports.iter().any(|p| p.port == port.port))
                .map(|(grant, _)| grant.clone())
                .collect(),
        }
    }

    /// The StartSession request for one connection, with `reason`.
    pub fn start_request(&self, reason: &str) -> StartSessionRequest {
        StartSessionRequest::port(
            &self.instance_id,
            &self.document,
            self.port_parameter,
            reason,
        )
    }
}

/// The endpoints described by a set of Services' annotations, by listen port. Services that do
/// not follow the contract are skipped with a warning, and so is a port whose listen port
/// another Service already claimed (the operator never hands one out twice). Pure.
pub fn endpoints<'a>(
    annotations: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> BTreeMap<u16, Endpoint> {
    let mut out: BTreeMap<u16, Endpoint> = BTreeMap::new();
    for (service, annotations) in annotations {
        match EndpointAnnotations::parse(annotations) {
            Ok(parsed) => {
                let grants = bridge_contract::grant_ports(annotations);
                for port in &parsed.ports {
                    let endpoint = Endpoint::from_contract(&parsed, port, &grants);
                    if let Some(claimed) = out.get(&endpoint.listen_port) {
                        warn!(
                            service,
                            listen_port = endpoint.listen_port,
                            claimed_by = claimed.instance_id,
                            "skipping a port whose listen port another Service claims"
                        );
                        continue;
                    }
                    out.insert(endpoint.listen_port, endpoint);
                }
            }
            Err(error) => {
                warn!(service, %error, "skipping a Service that does not describe an endpoint")
            }
        }
    }
    out
}

struct Running {
    endpoint: Endpoint,
    /// Cancelled when the endpoint is removed: closes the listener and its tunnels.
    removed: CancellationToken,
}

/// Who each connection is from, whether a grant admits it, and where its record goes.
#[derive(Clone, Default)]
pub struct Clients {
    /// Resolves a connection's source address to its client pod.
    pub pods: PodDirectory,
    /// The grants' NetworkPolicies a connection must be admitted by; none: every connection
    /// is (the CNI alone decides who reaches a listener).
    pub policies: Option<ClientPolicies>,
    /// Takes each connection's record; none: no records.
    pub sink: Option<Arc<dyn AuditSink>>,
}

impl Clients {
    /// No attribution, no check of the grants' policies, no records (the demo, benchmarks).
    pub fn none() -> Self {
        Self::default()
    }
}

/// What every connection of every listener shares: the sessions' context, admission, and who
/// the clients are.
struct Serving<C> {
    context: Arc<SessionContext<C>>,
    admission: Admission,
    clients: Clients,
    /// Room for connections that wait for a grant to admit them ([`WAITING_LIMIT`]).
    waiting: Arc<tokio::sync::Semaphore>,
    /// Room for refused connections that linger ([`LINGERING_LIMIT`]).
    lingering: tokio::sync::Semaphore,
    /// The connections carried now that a grant's policy admitted, checked again on changes.
    carried: Mutex<UnderPolicy>,
}

/// The connections a grant's policy admitted, carried now, by a number of their own.
#[derive(Default)]
struct UnderPolicy {
    next: u64,
    open: HashMap<u64, Admittance>,
}

/// What a carried connection was admitted as, and how to end it.
struct Admittance {
    address: IpAddr,
    listen_port: u16,
    stop: CancellationToken,
    /// Set when no grant admits it any more.
    revoked: Arc<AtomicBool>,
}

/// A connection's place in [`UnderPolicy`], given back when dropped.
struct CarriedPlace<'a> {
    carried: &'a Mutex<UnderPolicy>,
    number: u64,
    revoked: Arc<AtomicBool>,
}

impl Drop for CarriedPlace<'_> {
    fn drop(&mut self) {
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        carried.open.remove(&self.number);
    }
}

/// The least time between two checks of the carried connections: the changes of a busy
/// cluster come together into one check.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The set of open endpoint listeners.
pub struct Listeners<C> {
    serving: Arc<Serving<C>>,
    address: IpAddr,
    running: BTreeMap<u16, Running>,
    /// Cancelled at shutdown: stop accepting.
    draining: CancellationToken,
    /// Cancelled after the grace period: terminate remaining sessions.
    terminate: CancellationToken,
    tasks: TaskTracker,
    /// Whether carried connections are checked again when the grants' policies change.
    rechecking: bool,
}

impl<C: ControlPlane + 'static> Listeners<C> {
    /// No listeners yet; they will bind on `address`, and check and account for each
    /// connection's client with `clients`.
    pub fn new(
        context: Arc<SessionContext<C>>,
        limits: Limits,
        address: IpAddr,
        clients: Clients,
    ) -> Self {
        let admission = Admission::new(limits, context.budget.clone());
        Self {
            serving: Arc::new(Serving {
                context,
                admission,
                clients,
                waiting: Arc::new(tokio::sync::Semaphore::new(WAITING_LIMIT)),
                lingering: tokio::sync::Semaphore::new(LINGERING_LIMIT),
                carried: Mutex::default(),
            }),
            address,
            running: BTreeMap::new(),
            draining: CancellationToken::new(),
            terminate: CancellationToken::new(),
            tasks: TaskTracker::new(),
            rechecking: false,
        }
    }

    /// Makes the open listeners exactly `desired`: closes the removed or changed ones (and their
    /// tunnels), opens the new ones. Returns the endpoints that failed to bind.
    pub async fn apply(
        &mut self,
        desired: &BTreeMap<u16, Endpoint>,
    ) -> Vec<(Endpoint, std::io::Error)> {
        if let (false, Some(policies)) = (self.rechecking, &self.serving.clients.policies) {
            let recheck = self
                .serving
                .clone()
                .recheck(policies.clone(), self.draining.clone());
            self.tasks.spawn(recheck);
            self.rechecking = true;
        }
        let stale: Vec<u16> = self
            .running
            .iter()
            .filter(|(key, running)| desired.get(*key) != Some(&running.endpoint))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            if let Some(running) = self.running.remove(&key) {
                info!(
                    instance = running.endpoint.instance_id,
                    remote_host = running.endpoint.remote_host,
                    port = running.endpoint.port,
                    "closing endpoint"
                );
                running.removed.cancel();
            }
        }
        let mut failed = Vec::new();
        for (key, endpoint) in desired {
            if self.running.contains_key(key) || self.draining.is_cancelled() {
                continue;
            }
            match TcpListener::bind(SocketAddr::new(self.address, endpoint.listen_port)).await {
                Ok(listener) => {
                    self.serving
                        .context
                        .metrics
                        .expect_document(&endpoint.document);
                    info!(
                        instance = endpoint.instance_id,
                        remote_host = endpoint.remote_host,
                        port = endpoint.port,
                        listen = endpoint.listen_port,
                        "opening endpoint"
                    );
                    // Cancelled by the endpoint's removal or, through its parent, at the end
                    // of the grace period; each tunnel's token is a child of it.
                    let removed = self.terminate.child_token();
                    self.tasks.spawn(accept_loop(
                        listener,
                        endpoint.clone(),
                        self.serving.clone(),
                        self.draining.clone(),
                        removed.clone(),
                        self.tasks.clone(),
                    ));
                    self.running.insert(
                        *key,
                        Running {
                            endpoint: endpoint.clone(),
                            removed,
                        },
                    );
                }
                Err(error) => failed.push((endpoint.clone(), error)),
            }
        }
        self.serving
            .context
            .metrics
            .set_endpoints(self.running.len());
        failed
    }

    /// The endpoints open now.
    pub fn open(&self) -> Vec<&Endpoint> {
        self.running.values().map(|r| &r.endpoint).collect()
    }

    /// Stops accepting, lets running sessions finish for up to `grace`, then terminates the rest
    /// and waits for them to close.
    pub async fn shutdown(mut self, grace: Duration) {
        self.draining.cancel();
        self.running.clear();
        self.serving.context.metrics.set_endpoints(0);
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            info!("grace period over; terminating the remaining sessions");
            self.terminate.cancel();
            self.tasks.wait().await;
        }
    }
}

async fn accept_loop<C: ControlPlane + 'static>(
    listener: TcpListener,
    endpoint: Endpoint,
    serving: Arc<Serving<C>>,
    draining: CancellationToken,
    removed: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = draining.cancelled() => return,
            () = removed.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let connected_at = Instant::now();
        // Either the endpoint's removal or the end of the grace period (its parents) stops the
        // connection, as does a timeout of the tunnel itself.
        let stop = removed.child_token();
        // `carry` fills in the session ID once StartSession returns.
        let span = info_span!(
            "tunnel",
            instance = %endpoint.instance_id,
            remote_host = endpoint.remote_host,
            port = endpoint.port,
            client = %peer,
            session_id = tracing::field::Empty,
        );
        let record = Record::begin(&endpoint, peer, &serving.clients.pods);
        let connection = Connection {
            endpoint: endpoint.clone(),
            stream,
            peer,
            connected_at,
            stop,
        };
        // What is decided at once is decided here, in the order connections arrive: a client
        // a grant admits takes its place before the next connection is looked at.
        let serving = serving.clone();
        match serving.first_look(record, &connection) {
            Look::Admitted(record) => match serving.admit(&record, &connection.endpoint) {
                Ok(admitted) => tasks.spawn(
                    serving
                        .carry_admitted(connection, record, admitted)
                        .instrument(span),
                ),
                Err(refusal) => tasks.spawn(serving.refuse(connection, record, refusal)),
            },
            Look::Refused(record, refusal) => {
                tasks.spawn(serving.refuse(connection, record, refusal))
            }
            Look::Wait(record, waiting, policies) => {
                let waited = serving.wait(connection, record, waiting, policies);
                tasks.spawn(waited.instrument(span))
            }
        };
    }
}

/// One accepted connection.
struct Connection {
    endpoint: Endpoint,
    stream: TcpStream,
    peer: SocketAddr,
    connected_at: Instant,
    stop: CancellationToken,
}

/// What the first look at the grants' policies says of a connection.
enum Look {
    /// A grant admits it (or nothing is checked): the record names the grants.
    Admitted(Record),
    /// None does, and it may not wait.
    Refused(Record, Refusal),
    /// None does yet: it waits for `policies` to, holding one of the places to wait.
    Wait(Record, tokio::sync::OwnedSemaphorePermit, ClientPolicies),
}

/// How many connections no grant admits yet may wait together for the watches to catch up;
/// past it, such a connection is refused at once.
const WAITING_LIMIT: usize = 256;

/// How many refused connections may linger together ([`REFUSAL_LINGER`]); past it, a refused
/// connection is closed once told why.
const LINGERING_LIMIT: usize = 1024;

impl<C: ControlPlane + 'static> Serving<C> {
    /// The grants' policies, looked at once: a client a grant admits goes on to the limits; one
    /// none admits yet waits, while there is room to wait.
    fn first_look(&self, record: Record, connection: &Connection) -> Look {
        let Some(policies) = &self.clients.policies else {
            return Look::Admitted(record);
        };
        let (pods, peer) = (&self.clients.pods, connection.peer);
        let verdict = policies.look(pods, peer.ip(), connection.endpoint.listen_port);
        match record.judged(peer, verdict) {
            (record, true) => Look::Admitted(record),
            (record, false) => match self.waiting.clone().try_acquire_owned() {
                Ok(waiting) => Look::Wait(record, waiting, policies.clone()),
                Err(_) => Look::Refused(record, Refusal::ClientNotAdmitted),
            },
        }
    }

    /// Waits for a grant to admit the connection (for a bounded while, and while its endpoint
    /// stays), then goes on to the limits and the session, or refuses it.
    async fn wait(
        self: Arc<Self>,
        connection: Connection,
        record: Record,
        waiting: tokio::sync::OwnedSemaphorePermit,
        policies: ClientPolicies,
    ) {
        let (pods, peer) = (&self.clients.pods, connection.peer);
        let port = connection.endpoint.listen_port;
        let verdict = tokio::select! {
            verdict = policies.admit(pods, peer.ip(), port) => verdict,
            () = connection.stop.cancelled() => {
                return self.refuse(connection, record, Refusal::EndpointClosed).await;
            }
        };
        drop(waiting);
        match record.judged(peer, verdict) {
            (record, true) => match self.admit(&record, &connection.endpoint) {
                Ok(admitted) => self.carry_admitted(connection, record, admitted).await,
                Err(refusal) => self.refuse(connection, record, refusal).await,
            },
            (record, false) => {
                self.refuse(connection, record, Refusal::ClientNotAdmitted)
                    .await;
            }
        }
    }

    /// The limits, for the client the record names.
    fn admit(&self, record: &Record, endpoint: &Endpoint) -> Result<Admitted, Refusal> {
        let share = Share::of(&record.client, self.clients.pods.is_watching());
        self.admission.admit(&endpoint.instance_id, share.as_ref())
    }

    /// Carries an admitted connection through its own session; while the grants' policies are
    /// checked, until none admits its client any more.
    async fn carry_admitted(
        self: Arc<Self>,
        connection: Connection,
        record: Record,
        admitted: Admitted,
    ) {
        let Connection {
            endpoint,
            stream,
            peer,
            connected_at,
            stop,
        } = connection;
        let place = (self.clients.policies.is_some())
            .then(|| self.hold_place(peer.ip(), endpoint.listen_port, &stop));
        let mut admitted = admitted;
        let context = &self.context;
        let reason = clients::reason(&context.reason, &record.client, &record.draft.grants);
        let request = endpoint.start_request(&reason);
        let (stream, counts) = Counted::new(stream);
        let lease = admitted.lease.take();
        let carried = carry(context, &request, stream, connected_at, stop, None, lease).await;
        match &carried.ending {
            Ending::NotStarted(error) => warn!(%error, "connection not carried"),
            Ending::Failed(error) => warn!(%error, "connection not carried to its end"),
            _ => {}
        }
        // Its slot is free before its record says it ended.
        drop(admitted);
        let mut ended = record.end(carried, &counts);
        if (place.as_ref()).is_some_and(|p| p.revoked.load(Ordering::Relaxed)) {
            ended.detail = Some("no grant admits the client any more".to_owned());
        }
        self.write(ended);
    }

    /// A place among the carried connections for the one from `address` to `listen_port`.
    fn hold_place(
        &self,
        address: IpAddr,
        listen_port: u16,
        stop: &CancellationToken,
    ) -> CarriedPlace<'_> {
        let revoked = Arc::new(AtomicBool::new(false));
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        let number = carried.next;
        carried.next += 1;
        carried.open.insert(
            number,
            Admittance {
                address,
                listen_port,
                stop: stop.clone(),
                revoked: revoked.clone(),
            },
        );
        CarriedPlace {
            carried: &self.carried,
            number,
            revoked,
        }
    }

    /// Until `draining`: after each change of what `policies` watch (at most once per
    /// [`RECHECK_INTERVAL`]), ends the carried connections that no grant admits any more.
    async fn recheck(self: Arc<Self>, policies: ClientPolicies, draining: CancellationToken) {
        let mut changes = policies.changes();
        loop {
            tokio::select! {
                () = draining.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            tokio::select! {
                () = draining.cancelled() => return,
                () = tokio::time::sleep(RECHECK_INTERVAL) => {}
            }
            changes.borrow_and_update();
            let open: Vec<(IpAddr, u16, CancellationToken, Arc<AtomicBool>)> = {
                let carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
                (carried.open.values())
                    .map(|a| (a.address, a.listen_port, a.stop.clone(), a.revoked.clone()))
                    .collect()
            };
            // Many connections come from one client to one port: one look each.
            let mut admitted: HashMap<(IpAddr, u16), bool> = HashMap::new();
            for (address, port, stop, revoked) in open {
                let still = *admitted.entry((address, port)).or_insert_with(|| {
                    let verdict = policies.look(&self.clients.pods, address, port);
                    matches!(verdict, Verdict::Admitted { .. })
                });
                if !still {
                    warn!(client = %address, listen_port = port, "ending a connection no grant admits any more");
                    revoked.store(true, Ordering::Relaxed);
                    stop.cancel();
                }
            }
        }
    }

    /// Counts, logs and records the refusal, and tells the client why.
    async fn refuse(self: Arc<Self>, connection: Connection, record: Record, refusal: Refusal) {
        let Connection {
            endpoint,
            stream,
            peer,
            ..
        } = connection;
        self.context
            .metrics
            .connection_refused(refusal.metric_label());
        warn!(instance = endpoint.instance_id, port = endpoint.port, client = %peer, %refusal, "refusing connection");
        self.write(record.refused(&refusal));
        let lingering = self.lingering.try_acquire().ok();
        refuse(stream, &refusal.to_string(), lingering.is_some()).await;
    }
}

impl<C> Serving<C> {
    fn write(&self, record: ConnectionRecord) {
        if let Some(sink) = &self.clients.sink {
            sink.record(&record);
        }
    }
}

/// A connection's record while it is carried: who, to what, since when.
struct Record {
    client: Client,
    draft: ConnectionRecord,
}

impl Record {
    fn begin(endpoint: &Endpoint, peer: SocketAddr, clients: &PodDirectory) -> Self {
        let client = clients.resolve(peer.ip());
        let now = Timestamp::now();
        let draft = ConnectionRecord {
            record: "connection",
            client: ClientRecord::new(peer.ip(), &client),
            grants: endpoint.grants.clone(),
            instance: endpoint.instance_id.clone(),
            remote_host: endpoint.remote_host.clone(),
            port: endpoint.port,
            document: endpoint.document.clone(),
            session_id: None,
            start: now,
            end: now,
            bytes_from_client: 0,
            bytes_to_client: 0,
            ended: Ended::Refused,
            detail: None,
        };
        Self { client, draft }
    }

    /// The record of the client as `verdict` resolved it, and whether a grant admits it: through
    /// the grants that admit it, or, when none does, through the endpoint's.
    fn judged(self, peer: SocketAddr, verdict: Verdict) -> (Self, bool) {
        let (client, grants, admitted) = match verdict {
            Verdict::Admitted { client, grants } => (client, grants, true),
            Verdict::NotAdmitted { client } => (client, self.draft.grants.clone(), false),
        };
        let draft = ConnectionRecord {
            client: ClientRecord::new(peer.ip(), &client),
            grants,
            ..self.draft
        };
        (Self { client, draft }, admitted)
    }

    fn refused(self, refusal: &Refusal) -> ConnectionRecord {
        ConnectionRecord {
            end: Timestamp::now(),
            detail: Some(refusal.to_string()),
            ..self.draft
        }
    }

    fn end(self, carried: Carried, counts: &ByteCounts) -> ConnectionRecord {
        let (ended, detail) = match carried.ending {
            Ending::ClientClosed => (Ended::ClientClosed, None),
            Ending::TargetClosed => (Ended::TargetClosed, carried.output),
            Ending::Terminated => (Ended::Terminated, None),
            Ending::Expired(expiry) => (Ended::Expired, Some(format!("{expiry:?}"))),
            Ending::NotStarted(error) => (Ended::Refused, Some(error.to_string())),
            Ending::Failed(error) => (Ended::Error, Some(error.to_string())),
        };
        ConnectionRecord {
            session_id: carried.session_id,
            end: Timestamp::now(),
            bytes_from_client: counts.from_client.load(Ordering::Relaxed),
            bytes_to_client: counts.to_client.load(Ordering::Relaxed),
            ended,
            detail: detail.filter(|d| !d.trim().is_empty()),
            ..self.draft
        }
    }
}

/// Tells a refused client why in one line, then closes; when it may `linger`, once it has read
/// what the client sent meanwhile (an SSH client sends its version at once) or
/// [`REFUSAL_LINGER`] has passed: a socket closed with unread data resets the connection, and
/// the client may lose the line.
async fn refuse(mut stream: TcpStream, reason: &str, linger: bool) {
    let _ = stream
        .write_all(format!("fleet-access: refused: {reason}\r\n").as_bytes())
        .await;
    let _ = stream.shutdown().await;
    if !linger {
        return;
    }
    let drain = async {
        let (mut buffer, mut read) = ([0u8; 4096], 0);
        while read < REFUSAL_DRAIN {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

/// How long a refused connection stays open to read what its client sends after the refusal.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How much of it is read at most.
const REFUSAL_DRAIN: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(instance: &str, ports: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("fleetaccess.io/instance-id".to_owned(), instance.to_owned()),
            ("fleetaccess.io/ports".to_owned(), ports.to_owned()),
        ])
    }

    #[test]
    fn endpoints_come_from_every_valid_service() {
        let a = annotations(
            "i-0123abcd",
            r#"[{"port":22,"targetPort":20001,"document":"AWS-StartSSHSession","portParameter":22}]"#,
        );
        let b = annotations(
            "i-0fedcba9",
            r#"[{"port":5432,"targetPort":20002,"document":"pg"}]"#,
        );
        // A database behind the same instance, on the instance's own port number.
        let mut db = annotations(
            "i-0123abcd",
            r#"[{"port":5432,"targetPort":20003,"document":"to-db"}]"#,
        );
        db.insert("fleetaccess.io/remote-host".into(), "db.internal".into());
        let broken = annotations("i-1", "not json");
        // A Service claiming a listen port that is taken loses that port only.
        let thief = annotations(
            "i-2",
            r#"[{"port":22,"targetPort":20001,"document":"AWS-StartSSHSession"}]"#,
        );
        let set = endpoints([
            ("a", &a),
            ("b", &b),
            ("db", &db),
            ("broken", &broken),
            ("thief", &thief),
        ]);
        assert_eq!(
            set.keys().copied().collect::<Vec<_>>(),
            [20001, 20002, 20003]
        );
        let ssh = &set[&20001];
        assert_eq!((ssh.instance_id.as_str(), ssh.port), ("i-0123abcd", 22));
        let request = ssh.start_request("why");
        assert_eq!(request.parameters["portNumber"], ["22"]);
        assert_eq!(request.reason.as_deref(), Some("why"));
        assert!(set[&20002].start_request("why").parameters.is_empty());
        let to_db = &set[&20003];
        assert_eq!(
            (
                to_db.remote_host.as_deref(),
                to_db.port,
                to_db.document.as_str()
            ),
            (Some("db.internal"), 5432, "to-db")
        );
    }
}
