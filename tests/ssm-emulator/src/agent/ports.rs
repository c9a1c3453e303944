//! Port forwarding behind the session: basic mode (one target connection) and mux mode
//! (smux streams), with the strict checks on the client's smux and the events of the port tasks.

use super::*;

impl Agent {
    pub(super) fn target(&self) -> Option<std::net::SocketAddr> {
        let p = self.info.port()?;
        self.info.instance.resolve(self.remote_host(), p.port)
    }

    /// The remote host the Port plugin forwards to: the `host` parameter, which an agent
    /// older than remote-host support does not know (it forwards to its own port instead,
    /// whatever the document says).
    fn remote_host(&self) -> Option<&str> {
        let host = self
            .info
            .port()?
            .host
            .as_deref()
            .filter(|h| !h.is_empty())?;
        crate::version::agent_forwards_to_remote_hosts(&self.info.instance.agent_version)
            .then_some(host)
    }

    /// Whether the Port plugin may forward where the session's properties say: for a remote
    /// host, the agent checks its addresses first (`destination`), and a refusal fails the
    /// session with the agent's words before anything is dialled.
    pub(super) fn destination_allowed(&mut self) -> bool {
        let Some(host) = self.remote_host().map(str::to_owned) else {
            return true;
        };
        let instance = &self.info.instance;
        let addresses = instance.addresses_of(&host);
        match crate::destination::check(&host, &addresses, &instance.agent_version) {
            Ok(()) => true,
            Err(refusal) => {
                self.end(SessionStatus::Failed, refusal, false);
                false
            }
        }
    }

    pub(super) fn start_basic(&mut self) {
        self.port = PortState::Basic(BasicPort {
            generation: 0,
            state: BasicState::Idle,
        });
        self.dial_basic();
    }

    /// Dials the basic connection again (a new generation: events of older ones are stale).
    pub(super) fn dial_basic(&mut self) {
        let target = self.target();
        let PortState::Basic(b) = &mut self.port else {
            return;
        };
        b.generation += 1;
        b.state = BasicState::Dialing;
        let generation = b.generation;
        self.effects.push(Effect::DialBasic { generation, target });
    }

    pub(super) fn start_mux(&mut self, keepalive: bool) {
        self.port = PortState::Mux(MuxPort {
            ready: false,
            streams: HashSet::new(),
            keepalive,
            last_rx: self.now,
            last_nop: self.now,
        });
        self.smux = Some(SmuxLedger::default());
        self.effects.push(Effect::StartMux);
    }

    /// Client Output `seq` after the handshake: forwarded while the session runs. Once it has
    /// begun to end, the agent's port plugin has stopped and closed its connections: the write
    /// fails, so the message is neither acknowledged nor processed (`port_basic.go`,
    /// `port_mux.go`) and the client resends it until the end. Its bytes are still checked,
    /// once.
    pub(super) fn on_output(&mut self, seq: i64, data: &[u8]) -> Processed {
        if self.is_closing() {
            if self.checked_while_closing != Some(seq) {
                self.checked_while_closing = Some(seq);
                self.on_smux_bytes(data);
            }
            return Processed::NotReady;
        }
        let delivery = match &mut self.port {
            PortState::None | PortState::Shell(_) => Delivery::NotReady,
            PortState::Basic(b) => match b.state {
                BasicState::Up => {
                    let chunk = self.target_backlog.hold(data.to_vec());
                    self.effects.push(Effect::ToBasic(chunk));
                    Delivery::Written
                }
                BasicState::Dialing => Delivery::NotReady,
                BasicState::Idle => Delivery::Redial,
            },
            PortState::Mux(mx) if !mx.ready => Delivery::NotReady,
            PortState::Mux(_) => Delivery::Mux,
        };
        match delivery {
            Delivery::NotReady => return Processed::NotReady,
            Delivery::Redial => {
                self.dial_basic();
                return Processed::NotReady;
            }
            Delivery::Mux => self.on_smux_bytes(data),
            Delivery::Written => {}
        }
        self.last_activity = self.now;
        let backlog = self.target_backlog.bytes() as u64;
        let mut report = lock(&self.report);
        report.bytes_from_client += data.len() as u64;
        report.peak_target_backlog_bytes = report.peak_target_backlog_bytes.max(backlog);
        Processed::Done
    }

    /// Feeds the client's smux byte stream (mux mode only) to the checks and the streams.
    pub(super) fn on_smux_bytes(&mut self, data: &[u8]) {
        let Some(ledger) = &mut self.smux else {
            return;
        };
        let headers_before = ledger.decoder.headers_read();
        let pushed = ledger.decoder.push(data);
        // Only a whole frame header is activity for the smux keepalive, as in xtaci.
        if ledger.decoder.headers_read() > headers_before
            && let PortState::Mux(mx) = &mut self.port
        {
            mx.last_rx = self.now;
        }
        let frames = match pushed {
            Ok(frames) => frames,
            Err(e) => {
                // The whole smux session is dead (xtaci semantics); nothing more is decoded.
                self.smux = None;
                self.violation(format!("fatal smux error: {e}"));
                self.end(
                    SessionStatus::Failed,
                    format!("smux session died: {e}"),
                    false,
                );
                return;
            }
        };
        for f in frames {
            self.on_smux_frame(f);
        }
    }

    pub(super) fn on_smux_frame(&mut self, f: smux::Frame) {
        let sid = f.stream_id;
        let Some(ledger) = &mut self.smux else {
            return;
        };
        match f.command {
            smux::Command::Nop => {}
            // Read and ignored by the agent's smux (version 1): the client expects a window
            // that no one keeps.
            smux::Command::Upd => self.violation(format!(
                "smux UPD for stream {sid}: a version 2 window update in a version 1 session"
            )),
            smux::Command::Syn => {
                if sid == 0 || sid.is_multiple_of(2) {
                    self.violation(format!(
                        "smux SYN with stream id {sid} (client ids are odd)"
                    ));
                    return;
                }
                if ledger.open.contains(&sid) || ledger.closed.contains(&sid) {
                    self.violation(format!("smux stream id {sid} reused"));
                    return;
                }
                ledger.open.insert(sid);
                lock(&self.report).smux_streams_opened += 1;
                self.open_mux_stream(sid);
            }
            smux::Command::Psh => {
                if ledger.fin_from_client.contains(&sid) {
                    // xtaci may still hand it to the target: a write after close, whatever
                    // becomes of it.
                    self.violation(format!(
                        "smux PSH for stream {sid} after the client's own FIN for it"
                    ));
                } else if ledger.open.contains(&sid) {
                    self.write_mux_stream(sid, f.data);
                } else if !ledger.closed.contains(&sid) {
                    self.violation(format!("smux PSH for stream {sid}, which was never opened"));
                }
            }
            smux::Command::Fin => {
                ledger.fin_from_client.insert(sid);
                if ledger.close(sid) {
                    lock(&self.report).smux_streams_closed_by_client += 1;
                    self.close_mux_stream(sid);
                }
            }
        }
    }

    /// Dials the target for a new smux stream (while the session runs).
    pub(super) fn open_mux_stream(&mut self, sid: u32) {
        if self.is_closing() {
            return;
        }
        let target = self.target();
        let PortState::Mux(mx) = &mut self.port else {
            return;
        };
        mx.streams.insert(sid);
        self.effects.push(Effect::OpenStream { id: sid, target });
    }

    /// Input for smux stream `sid`, while the stream is known.
    fn send_to_stream(&mut self, sid: u32, input: impl FnOnce(&TargetBacklog) -> StreamInput) {
        if let PortState::Mux(mx) = &self.port
            && mx.streams.contains(&sid)
        {
            let input = input(&self.target_backlog);
            self.effects.push(Effect::ToStream { id: sid, input });
        }
    }

    pub(super) fn write_mux_stream(&mut self, sid: u32, data: Vec<u8>) {
        if self.is_closing() {
            return;
        }
        self.send_to_stream(sid, |backlog| StreamInput::Data(backlog.hold(data)));
    }

    /// The client's FIN: the stream's task writes what came before it to the target (after its
    /// dial, when that is still under way), closes the connection, and sends the stream's FIN
    /// after its last data.
    pub(super) fn close_mux_stream(&mut self, sid: u32) {
        self.send_to_stream(sid, |_| StreamInput::Fin);
    }

    /// A stream whose dial failed: forgotten, and its FIN sent (it never carried data).
    pub(super) fn fail_mux_stream(&mut self, sid: u32) {
        if let PortState::Mux(mx) = &mut self.port
            && mx.streams.remove(&sid)
        {
            let fin = smux::Frame::control(smux::Command::Fin, sid).encode();
            self.effects.push(Effect::ForgetStream { id: sid });
            self.effects.push(Effect::SmuxControl(fin));
        }
    }

    /// The basic connection of `generation`, when it is the current one.
    pub(super) fn basic_port(&mut self, generation: u64) -> Option<&mut BasicPort> {
        match &mut self.port {
            PortState::Basic(b) if b.generation == generation => Some(b),
            _ => None,
        }
    }

    pub(super) fn on_port_event(&mut self, event: PortEvent) {
        if self.is_closing() {
            // The targets no longer matter (what they read gives its room back as it drops).
            return;
        }
        match event {
            PortEvent::BasicUp { generation } => {
                // Like the agent, early messages wait for the next in-order arrival (the
                // client's retransmission of what was not acknowledged meanwhile).
                if let Some(b) = self.basic_port(generation) {
                    b.state = BasicState::Up;
                }
            }
            PortEvent::MuxReady => {
                if let PortState::Mux(mx) = &mut self.port {
                    mx.ready = true;
                }
            }
            PortEvent::BasicDialFailed { generation, error } => {
                if self.basic_port(generation).is_some() {
                    let output = format!("Unable to connect to specified port: {error}");
                    self.end(SessionStatus::Failed, output, false);
                }
            }
            PortEvent::BasicData {
                generation,
                data,
                room,
            } => {
                if self.basic_port(generation).is_some() {
                    self.send_stream(payload_type::OUTPUT, data, Some(room));
                }
            }
            PortEvent::BasicClosed { generation } => {
                let local_port_forwarding =
                    self.info.port().is_some_and(|p| p.local_port_forwarding);
                if let Some(b) = self.basic_port(generation) {
                    if local_port_forwarding {
                        b.state = BasicState::Idle;
                        self.effects.push(Effect::CloseBasic);
                    } else {
                        self.end(
                            SessionStatus::Terminated,
                            "the target closed the connection".to_owned(),
                            true,
                        );
                    }
                }
            }
            PortEvent::MuxDialFailed { stream_id, error } => {
                if !matches!(self.port, PortState::Mux(_)) {
                    return;
                }
                tracing::debug!(session = %self.info.id, stream_id, "dial failed: {error}");
                self.fail_mux_stream(stream_id);
                if let Some(ledger) = &mut self.smux {
                    ledger.close(stream_id);
                }
                lock(&self.report).smux_dial_failures += 1;
                self.send_stream(
                    payload_type::FLAG,
                    message::flag_payload(flag::CONNECT_TO_PORT_ERROR),
                    None,
                );
            }
            PortEvent::MuxClosed { stream_id } => {
                if let PortState::Mux(mx) = &mut self.port
                    && mx.streams.remove(&stream_id)
                {
                    self.effects.push(Effect::ForgetStream { id: stream_id });
                }
                if let Some(ledger) = &mut self.smux {
                    ledger.close(stream_id);
                }
            }
            PortEvent::MuxOutput { data, room } => {
                if matches!(self.port, PortState::Mux(_)) {
                    self.send_stream(payload_type::OUTPUT, data, Some(room));
                }
            }
        }
    }
}
