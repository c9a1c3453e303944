//! The loop of one running tunnel: the state a tunnel keeps while it runs, and what it does
//! with each input (a WebSocket frame, a local connection's read or write, a timer, a deadline,
//! room in the memory budget). Everything here runs on the tunnel's one task.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info, warn};

use super::local::{LocalEvent, Locals};
use super::share::Share;
use super::{
    ConnectError, DriverError, Expiry, LOCAL_FLUSH_GRACE, Milestone, Milestones, Outcome,
    TerminalSize, Tunnel, Ws,
};
use crate::protocol::kms::DataKey;
use crate::protocol::{CloseCause, Event, ForwardingMode, Session, SessionError, Transmit};
use crate::ssm::{ControlPlane, StreamTarget};

/// The mutable state of one running tunnel.
pub(super) struct Run<'t, 'a, C, L> {
    tunnel: &'t Tunnel<'a, C>,
    /// A shell session's terminal sizes.
    terminal: Option<watch::Receiver<TerminalSize>>,
    /// A shell's KMS data key, on its way from KMS.
    data_key: Option<futures::future::BoxFuture<'static, Result<DataKey, String>>>,
    pub(super) session: Session,
    pub(super) ws: Ws,
    pub(super) target: StreamTarget,
    incoming: mpsc::Receiver<L>,
    /// The local connections, open and closing.
    pub(super) locals: Locals<L>,
    next_basic_key: u32,
    /// Local bytes the session has not accepted yet (backpressure).
    pending_local: Option<(u32, Bytes)>,
    /// Basic mode: bytes the instance sent before a local connection was attached (a server
    /// that speaks first, such as sshd's banner). Events stop draining until one attaches, so
    /// the session's receive window holds the rest: nothing is dropped.
    unattached: Option<Bytes>,
    /// A frame taken from the session, to be written.
    outgoing: Option<Transmit>,
    last_heard: Instant,
    /// Since when the driver has been reading the WebSocket without a pause. While the local
    /// side is too slow the driver stops reading ([`Session::wants_frames`]), and neither
    /// silence nor missing acks say anything about the peer then.
    listening_since: Instant,
    mode: Option<ForwardingMode>,
    /// The session's share of a memory budget, if the bridge has one. Dropped with the run,
    /// after the connections wrote out what they held.
    share: Option<Share>,
    started: Instant,
    /// When a byte last went either way (the idle deadline runs from here).
    last_activity: Instant,
    milestones: Milestones,
    /// The deadline that ended the session.
    expired: Option<Expiry>,
    /// When the WebSocket went away while the session was ending (what it had received is
    /// still being written out).
    ws_gone_at: Option<Instant>,
}

enum Turn<L> {
    Shutdown,
    Ws(Option<Result<Message, tungstenite::Error>>),
    Send,
    Timer,
    Ping,
    Local(LocalEvent),
    Incoming(Option<L>),
    /// The terminal's size changed (false: it will not change any more).
    Resized(bool),
    /// KMS answered.
    DataKey(Result<DataKey, String>),
    /// The memory budget gave room.
    Room,
    /// The idle or maximum-duration deadline.
    Deadline,
}

impl<'t, 'a, C: ControlPlane, L> Run<'t, 'a, C, L>
where
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    pub(super) fn new(
        tunnel: &'t Tunnel<'a, C>,
        start: Instant,
        session: Session,
        ws: Ws,
        target: StreamTarget,
        incoming: mpsc::Receiver<L>,
        share: Option<Share>,
    ) -> Self {
        let terminal = tunnel.terminal.clone().map(|mut sizes| {
            // The size as it is now goes out first.
            sizes.mark_changed();
            sizes
        });
        let config = &tunnel.config;
        Run {
            tunnel,
            terminal,
            data_key: None,
            session,
            ws,
            target,
            incoming,
            locals: Locals::new(config.local_read_size, config.local_write_queue),
            next_basic_key: 0,
            pending_local: None,
            unattached: None,
            outgoing: None,
            last_heard: start,
            listening_since: start,
            mode: None,
            share,
            started: start,
            last_activity: start,
            milestones: Milestones::default(),
            expired: None,
            ws_gone_at: None,
        }
    }

    pub(super) async fn drive(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Outcome, DriverError> {
        tokio::pin!(shutdown);
        let mut shutting_down = false;
        let mut ping = keepalive_timer(self.tunnel.config.ping_interval);
        let mut incoming_open = true;
        loop {
            let now = Instant::now();
            self.feed_pending_local();
            if let Some(outcome) = self.drain_events(now) {
                return Ok(outcome);
            }
            if let Some(gone_at) = self.ws_gone_at {
                // Without the WebSocket nothing more arrives: end once what did is out (or,
                // for a connection that does not read it, after the flush grace).
                let flushed = !self.locals.backlogged();
                if flushed || now >= gone_at + LOCAL_FLUSH_GRACE {
                    return Ok(self.ended_without_transport());
                }
            } else if self.outgoing.is_none() {
                self.outgoing = self.session.poll_transmit(now.into_std());
            }
            if let Some(stats) = &self.tunnel.stats {
                stats.send_replace(self.session.stats());
            }
            self.settle_share();
            let timer = self.session.poll_timeout().map(Instant::from_std);
            let accepting = incoming_open && self.accepting();
            let reading = self.session.wants_frames();
            if !reading {
                self.listening_since = now;
            }
            // The connections are read while the session takes what they read, on the
            // budget's read credit.
            let read_limit = match (&self.pending_local, &self.share) {
                (Some(_), _) => 0,
                (None, Some(share)) => share.read_credit(),
                (None, None) => usize::MAX,
            };
            let polling_locals = !self.locals.is_idle();
            let locals = &mut self.locals;
            let sizes = self.terminal.as_mut().filter(|_| self.session.is_open());
            let resizing = sizes.is_some();
            let data_key = self.data_key.as_mut();
            let generating = data_key.is_some();
            let waiting_for_room = self.share.as_ref().is_some_and(Share::is_waiting);
            let share = self.share.as_mut();
            let flush_by = self.ws_gone_at.map(|at| at + LOCAL_FLUSH_GRACE);
            let deadline = (self.expired.is_none())
                .then(|| (self.tunnel.deadlines).next(self.started, self.last_activity))
                .flatten();
            let turn = tokio::select! {
                biased;
                () = &mut shutdown, if !shutting_down => Turn::Shutdown,
                () = std::future::ready(()), if self.outgoing.is_some() => Turn::Send,
                // Before the WebSocket: what was received is written out before more is read.
                event = std::future::poll_fn(|cx| locals.poll_event(cx, read_limit)), if polling_locals => Turn::Local(event),
                msg = self.ws.next(), if reading && self.ws_gone_at.is_none() => Turn::Ws(msg),
                () = due(timer.unwrap_or(now), now), if timer.is_some() => Turn::Timer,
                _ = ping.tick(), if self.ws_gone_at.is_none() => Turn::Ping,
                () = due(flush_by.unwrap_or(now), now), if flush_by.is_some() => Turn::Timer,
                conn = self.incoming.recv(), if accepting => Turn::Incoming(conn),
                changed = async { sizes?.changed().await.ok() }, if resizing => Turn::Resized(changed.is_some()),
                key = async {
                    match data_key {
                        Some(key) => key.await,
                        None => std::future::pending().await,
                    }
                }, if generating => Turn::DataKey(key),
                () = async { if let Some(share) = share { share.room().await } }, if waiting_for_room => Turn::Room,
                () = due(deadline.unwrap_or(now), now), if deadline.is_some() => Turn::Deadline,
            };
            let now = Instant::now();
            match turn {
                Turn::Shutdown => {
                    shutting_down = true;
                    self.session.terminate(now.into_std());
                }
                Turn::Ws(Some(Ok(message))) => {
                    self.last_heard = now;
                    self.reached(Milestone::FirstFrame, now);
                    self.on_ws_message(now, message);
                }
                Turn::Ws(_) => {
                    if let Some(outcome) = self.transport_lost().await? {
                        return Ok(outcome);
                    }
                }
                Turn::Send => {
                    let Some(Transmit { frame, kind }) = self.outgoing.take() else {
                        continue;
                    };
                    if let Err(e) = self.send_ws(Message::Binary(frame)).await {
                        debug!(error = %e, ?kind, "WebSocket send failed");
                        if let Some(outcome) = self.transport_lost().await? {
                            return Ok(outcome);
                        }
                    }
                }
                Turn::Timer => self.session.handle_timeout(now.into_std()),
                Turn::Ping => {
                    let limit = self.tunnel.config.dead_peer_timeout;
                    let listening = now.duration_since(self.listening_since) > limit;
                    let silent = now.duration_since(self.last_heard) > limit;
                    // A socket that still answers pings but never acks is just as dead.
                    let no_acks = self
                        .session
                        .ack_wait_since()
                        .is_some_and(|since| now.into_std().duration_since(since) > limit);
                    let dead = listening && (silent || no_acks);
                    if dead {
                        warn!(
                            silent,
                            no_acks,
                            "the data channel is not responding; treating the WebSocket as dead"
                        );
                    }
                    let lost = dead
                        || self
                            .send_ws(Message::Ping(Bytes::from_static(b"keepalive")))
                            .await
                            .is_err();
                    if lost && let Some(outcome) = self.transport_lost().await? {
                        return Ok(outcome);
                    }
                }
                Turn::DataKey(key) => {
                    self.data_key = None;
                    if let Err(e) = &key {
                        warn!(error = %e, "no KMS data key for the session's encryption");
                    }
                    self.session.provide_data_key(now.into_std(), key);
                }
                Turn::Resized(false) => self.terminal = None,
                Turn::Resized(true) => {
                    if let Some(sizes) = &mut self.terminal {
                        let size = *sizes.borrow_and_update();
                        let sent =
                            self.session
                                .send_terminal_size(now.into_std(), size.cols, size.rows);
                        if let Err(e) = sent {
                            debug!(error = %e, "terminal size not sent");
                        }
                    }
                }
                Turn::Room => {}
                Turn::Deadline => {
                    let deadlines = self.tunnel.deadlines;
                    if let Some(expiry) = deadlines.expired(now, self.started, self.last_activity) {
                        info!(?expiry, "the session reached its deadline; ending it");
                        self.expired = Some(expiry);
                        self.session.terminate(now.into_std());
                    }
                }
                Turn::Local(LocalEvent::Data(key, data)) => {
                    if let Some(share) = &mut self.share {
                        share.took_read(data.len());
                    }
                    self.last_activity = now;
                    self.pending_local = Some((key, data));
                    self.feed_pending_local();
                }
                Turn::Local(LocalEvent::Eof(key)) => self.local_eof(now, key),
                Turn::Local(LocalEvent::Gone(key)) => self.local_gone(now, key),
                Turn::Local(LocalEvent::Wrote) => {}
                Turn::Incoming(Some(conn)) => self.attach(conn),
                Turn::Incoming(None) => incoming_open = false,
            }
        }
    }

    /// One WebSocket write, bounded by [`DriverConfig::send_timeout`].
    async fn send_ws(&mut self, message: Message) -> Result<(), ConnectError> {
        tokio::time::timeout(self.tunnel.config.send_timeout, self.ws.send(message))
            .await
            .map_err(|_| ConnectError::TimedOut("a WebSocket write"))?
            .map_err(ConnectError::WebSocket)
    }

    fn accepting(&self) -> bool {
        match self.mode {
            Some(ForwardingMode::Basic) => self.locals.no_open() && self.session.is_open(),
            Some(ForwardingMode::Mux) => self.session.is_open() && self.session.send_capacity() > 0,
            None => false,
        }
    }

    fn on_ws_message(&mut self, now: Instant, message: Message) {
        let result = match &message {
            Message::Binary(b) => self.session.handle_ws_message(now.into_std(), b),
            Message::Text(t) => self.session.handle_ws_message(now.into_std(), t.as_bytes()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            debug!(error = %e, "dropped a data-channel frame");
        }
    }

    /// The WebSocket failed: resume it, or end here when the session was closing anyway.
    async fn transport_lost(&mut self) -> Result<Option<Outcome>, DriverError> {
        if self.session.is_closed() {
            // The agent closed the channel, and then its WebSocket. What the session received
            // still goes out to the connections: the loop drains the events without the
            // WebSocket, and ends when they are out.
            self.ws_gone_at.get_or_insert_with(Instant::now);
            self.outgoing = None;
            return Ok(None);
        }
        if self.mode.is_some() && !self.session.is_open() {
            // The bridge was ending the session: what is still undelivered is not wanted.
            return Ok(Some(self.ended_without_transport()));
        }
        self.outgoing = None;
        info!(session_id = %self.target.session_id, "WebSocket lost; resuming the session");
        let ws = Box::pin(self.tunnel.reconnect(&mut self.session, &mut self.target)).await?;
        self.ws = ws;
        self.last_heard = Instant::now();
        Ok(None)
    }

    /// The session ends without its WebSocket, once what it received is out.
    fn ended_without_transport(&mut self) -> Outcome {
        self.locals.close_all();
        Outcome {
            cause: CloseCause::LocalTerminate,
            output: None,
            handshake: self.session.handshake().cloned(),
            stats: self.session.stats(),
            expired: self.expired,
        }
    }

    /// Hands pending local bytes to the session as far as its window allows.
    fn feed_pending_local(&mut self) {
        let Some((key, data)) = self.pending_local.take() else {
            return;
        };
        let result = match self.mode {
            Some(ForwardingMode::Mux) => self.session.write_stream(key, &data),
            _ => self.session.handle_local_data(&data),
        };
        match result {
            Ok(n) if n < data.len() => self.pending_local = Some((key, data.slice(n..))),
            Ok(_) => {}
            Err(SessionError::NotOpen) => self.pending_local = Some((key, data)),
            Err(e) => debug!(error = %e, stream = key, "local data dropped"),
        }
    }

    fn local_eof(&mut self, now: Instant, key: u32) {
        if self.tunnel.config.session.shell && self.locals.is_open(key) {
            // A shell's output goes on after its input ends: the session types the terminal's
            // end-of-file, and the shell ends the session when it exits.
            let _ = self.session.disconnect_local(now.into_std());
            return;
        }
        if !self.locals.close(key) {
            return;
        }
        let now = now.into_std();
        match self.mode {
            Some(ForwardingMode::Mux) => {
                let _ = self.session.close_stream(key);
                self.end_when_no_stream_is_left(now);
            }
            _ if self.tunnel.config.end_on_local_eof => self.session.terminate(now),
            _ => {
                let _ = self.session.disconnect_local(now);
            }
        }
    }

    /// Mux mode, one connection per session: the session ends with its last stream.
    fn end_when_no_stream_is_left(&mut self, now: std::time::Instant) {
        if self.tunnel.config.end_on_local_eof && self.locals.no_open() {
            self.session.terminate(now);
        }
    }

    /// Writing to a local connection failed (its client has gone).
    fn local_gone(&mut self, now: Instant, key: u32) {
        if self.tunnel.config.session.shell {
            // Nobody sees the shell's output any more.
            self.locals.drop_conn(key);
            self.session.terminate(now.into_std());
            return;
        }
        self.local_eof(now, key);
    }

    fn attach(&mut self, conn: L) {
        let key = match self.mode {
            Some(ForwardingMode::Mux) => match self.session.open_stream() {
                Ok(id) => id,
                Err(e) => {
                    warn!(error = %e, "cannot open a stream; dropping the connection");
                    return;
                }
            },
            _ => {
                self.next_basic_key = self.next_basic_key.wrapping_add(1);
                self.next_basic_key
            }
        };
        self.locals.insert(key, conn);
        if let Some(data) = self.unattached.take() {
            self.deliver_local(key, data);
        }
    }

    /// Drains session events; returns the outcome once the session closed.
    fn drain_events(&mut self, now: Instant) -> Option<Outcome> {
        while !self.locals.backlogged() && self.unattached.is_none() {
            let event = self.session.poll_event()?;
            match event {
                Event::DataKeyRequired { key_id } => {
                    self.data_key = Some(match &self.tunnel.encryption {
                        Some(encryption) => encryption.keys.generate(
                            &key_id,
                            &self.target.session_id,
                            &encryption.target,
                        ),
                        None => Box::pin(std::future::ready(Err(
                            "this client has no KMS access configured".to_owned(),
                        ))),
                    });
                }
                Event::HandshakeComplete(info) => {
                    info!(agent_version = ?info.agent_version, mode = ?info.mode, "handshake complete");
                    self.mode = Some(info.mode);
                    self.reached(Milestone::Handshake, now);
                }
                Event::Data(data) => {
                    self.received(now);
                    match self.locals.first_open() {
                        Some(key) => self.deliver_local(key, data),
                        // Closing: no connection will attach any more, and the client these bytes
                        // were for has gone. Held, they would stop the events behind them, the
                        // session's close among them.
                        None if !self.session.is_open() && self.mode.is_some() => {
                            debug!(
                                bytes = data.len(),
                                "discarding bytes for a connection that ended"
                            );
                        }
                        None => self.unattached = Some(data),
                    }
                }
                Event::StreamData { stream, data } => {
                    self.received(now);
                    self.deliver_local(stream, data);
                }
                Event::StreamClosed { stream, reason } => {
                    debug!(stream, ?reason, "stream closed by the agent");
                    // It writes out what the agent sent before the close, then shuts down.
                    self.locals.close(stream);
                    self.end_when_no_stream_is_left(now.into_std());
                }
                Event::ConnectToPortError => {
                    warn!("the agent could not connect to the destination port");
                }
                Event::Closed { cause, output } => {
                    info!(?cause, output = ?output, "session closed");
                    self.locals.close_all();
                    return Some(Outcome {
                        cause,
                        output,
                        handshake: self.session.handshake().cloned(),
                        stats: self.session.stats(),
                        expired: self.expired,
                    });
                }
            }
        }
        None
    }

    /// Queues `data` toward connection `key` (dropped when it has gone).
    fn deliver_local(&mut self, key: u32, data: Bytes) {
        if !self.locals.deliver(key, data) {
            debug!(stream = key, "bytes for a connection that has gone");
        }
    }
}

impl<C, L> Run<'_, '_, C, L> {
    /// Settles the session's share of the memory budget against what the run holds now, and
    /// tells the session how much more it may receive.
    fn settle_share(&mut self) {
        let Some(share) = &mut self.share else {
            return;
        };
        let len = |chunk: &Option<(u32, Bytes)>| chunk.as_ref().map_or(0, |(_, data)| data.len());
        let held = self.session.buffered_bytes()
            + len(&self.pending_local)
            + self.locals.queued()
            + self.unattached.as_ref().map_or(0, Bytes::len)
            + self.outgoing.as_ref().map_or(0, |t| t.frame.len());
        let room = share.settle(held);
        let inbound = self.session.inbound_bytes();
        self.session.set_inbound_budget(inbound + room);
    }

    /// The instance's bytes arrived: activity, and maybe the first byte.
    fn received(&mut self, now: Instant) {
        self.last_activity = now;
        self.reached(Milestone::FirstByte, now);
    }

    /// Records `milestone` and tells the observer, the first time.
    fn reached(&mut self, milestone: Milestone, now: Instant) {
        if self.milestones.reach(milestone, now)
            && let Some(observer) = &self.tunnel.setup
        {
            observer(milestone, &self.milestones);
        }
    }
}

/// The WebSocket keepalive: first due one period from now. (`tokio::time::interval`'s first
/// tick is "immediate", but awaiting it waits for the timer's next millisecond tick: up to 1 ms
/// added to every session's setup.)
fn keepalive_timer(period: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Resolves at `at`, and at once when `at` is not after `now`. `sleep_until` alone would wait
/// for the timer even then: tokio rounds deadlines up to its next millisecond tick, which would
/// cap acks and paced data at about 1,000 frames per second.
async fn due(at: Instant, now: Instant) {
    if at > now {
        sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_deadline_already_reached_is_due_without_a_timer() {
        let now = Instant::now();
        assert_eq!(due(now, now).now_or_never(), Some(()));
        assert_eq!(
            due(now - Duration::from_millis(5), now).now_or_never(),
            Some(())
        );
        assert_eq!(due(now + Duration::from_secs(60), now).now_or_never(), None);
    }

    /// The driver starts turning at once: nothing about the keepalive is due at the start (a
    /// first tick at the start is awaited on the timer's next millisecond, in every session's
    /// setup). The first ping goes one whole period after it.
    #[tokio::test(start_paused = true)]
    async fn the_keepalive_is_first_due_a_period_after_the_start() {
        let period = Duration::from_secs(5);
        let started = Instant::now();
        let mut timer = keepalive_timer(period);
        assert!(timer.tick().now_or_never().is_none());
        timer.tick().await;
        assert_eq!(started.elapsed(), period);
        timer.tick().await;
        assert_eq!(started.elapsed(), 2 * period);
    }
}
