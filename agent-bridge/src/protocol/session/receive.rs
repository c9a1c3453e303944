//! What the session does with what the agent sends: acks both ways, room for received
//! messages (in order, early, within the inbound budget), the handshake request and the
//! session's opening, and delivery of received data as events.

use std::time::Instant;

use bytes::Bytes;

use super::*;

impl Session {
    fn queue_ack(&mut self, now: Instant, acked: &ClientMessage) {
        let content = AcknowledgeContent {
            message_type: acked.message_type.as_str().to_owned(),
            message_id: acked.message_id.hyphenated().to_string(),
            sequence_number: acked.sequence_number,
            is_sequential_message: true,
        };
        let payload = Bytes::from(serde_json::to_vec(&content).unwrap_or_default());
        let created = self.clock.epoch_ms(now);
        let id = self.ids.next();
        let frame = ClientMessage {
            message_type: MessageType::Acknowledge,
            schema_version: message::SCHEMA_VERSION,
            created_date: created,
            sequence_number: 0,
            flags: FLAG_SYN | FLAG_FIN,
            message_id: id,
            payload_type: PayloadType::Unset,
            payload,
        }
        .to_bytes();
        if self.control.len() >= MAX_PENDING_ACKS {
            // Dropping an ack is safe: the agent retransmits and we re-ack the duplicate.
            self.stats.acks_dropped += 1;
            return;
        }
        self.control.push_back(frame);
        self.stats.acks_sent += 1;
    }

    pub(super) fn handle_ack(&mut self, now: Instant, payload: &[u8]) {
        let Ok(content) = serde_json::from_slice::<AcknowledgeContent>(payload) else {
            self.stats.malformed_frames += 1;
            return;
        };
        if let AckOutcome::Released(_) = self.send.on_ack(now, content.sequence_number) {
            self.stats.acks_received += 1;
        }
    }

    /// Room for the next in-order message. Against the per-session bound only undrained events
    /// count: the reorder buffer empties behind this message, so counting it could refuse the
    /// one message that fills the gap for ever (a full reorder buffer waiting on a hole it will
    /// not admit). Against the inbound budget early messages count too, and the message that
    /// fills their gap is always taken: room for it was kept when they were.
    fn in_order_room(&self, len: usize) -> bool {
        (self.event_bytes == 0 || self.event_bytes + len <= self.config.max_inbound_bytes)
            && (self.within_inbound_budget(len) || self.awaits_gap())
    }

    /// Room to keep an early message until the gap before it fills, and then for the message
    /// that fills it.
    fn early_room(&self, len: usize) -> bool {
        self.recv.has_room()
            && self.recv.buffered_bytes() + len <= self.config.max_inbound_bytes
            && self.within_inbound_budget(len.saturating_add(INBOUND_HEADROOM))
    }

    /// Whether `more` received bytes fit the inbound budget.
    pub(super) fn within_inbound_budget(&self, more: usize) -> bool {
        self.inbound_bytes().saturating_add(more) <= self.inbound_budget
    }

    /// Early messages wait for a gap to fill.
    pub(super) fn awaits_gap(&self) -> bool {
        self.recv.buffered_messages() > 0
    }

    pub(super) fn handle_stream_message(&mut self, now: Instant, message: ClientMessage) {
        let len = message.payload.len();
        let is_data = message.payload_type == PayloadType::Output;
        match self.recv.classify(message.sequence_number) {
            Arrival::Duplicate => {
                self.stats.duplicates_received += 1;
                self.queue_ack(now, &message);
            }
            Arrival::Early => {
                if self.early_room(len) {
                    self.queue_ack(now, &message);
                    self.recv.store(message);
                } else {
                    self.stats.dropped_no_room += 1;
                }
            }
            Arrival::InOrder => {
                if is_data && !self.in_order_room(len) {
                    // Receive backpressure: not acked, the agent retransmits later.
                    self.stats.dropped_no_room += 1;
                    return;
                }
                self.queue_ack(now, &message);
                self.recv.advance();
                self.process(now, message);
                while let Some(next) = self.recv.pop_ready() {
                    self.recv.advance();
                    self.process(now, next);
                }
            }
        }
    }

    /// Acts on an accepted, in-order `output_stream_data`.
    fn process(&mut self, now: Instant, message: ClientMessage) {
        if matches!(self.state, State::Closed) {
            return;
        }
        match message.payload_type {
            PayloadType::HandshakeRequest => self.on_handshake_request(now, &message.payload),
            PayloadType::HandshakeComplete => {
                if matches!(
                    self.state,
                    State::AwaitingHandshake { .. } | State::AwaitingComplete { .. }
                ) {
                    let customer_message =
                        serde_json::from_slice::<HandshakeComplete>(&message.payload)
                            .ok()
                            .map(|c| c.customer_message)
                            .filter(|m| !m.is_empty());
                    self.open(now, customer_message);
                }
            }
            PayloadType::Output => {
                if matches!(
                    self.state,
                    State::AwaitingHandshake { .. } | State::AwaitingComplete { .. }
                ) {
                    // A legacy agent streams without a handshake; an agent never sends Output
                    // before HandshakeComplete otherwise, so treat it as implied.
                    self.open(now, None);
                }
                let payload = match &self.cipher {
                    Some(cipher) => match cipher.open(&message.payload) {
                        Ok(plain) => Bytes::from(plain),
                        Err(e) => {
                            self.close(CloseCause::Encryption(e.to_string()), None);
                            return;
                        }
                    },
                    None => message.payload,
                };
                self.deliver(payload);
            }
            PayloadType::EncChallengeRequest => {
                let Some(cipher) = &mut self.cipher else {
                    self.stats.ignored_messages += 1;
                    return;
                };
                match cipher.answer_challenge(&message.payload) {
                    Ok(answer) => {
                        self.push_sequenced(now, PayloadType::EncChallengeResponse, answer.into());
                    }
                    Err(e) => self.close(CloseCause::Encryption(e.to_string()), None),
                }
            }
            PayloadType::Flag => match PortFlag::from_payload(&message.payload) {
                Some(PortFlag::ConnectToPortError) => {
                    if let Some(mux) = &mut self.mux {
                        mux.connect_error();
                    }
                    self.events.push_back(Event::ConnectToPortError);
                }
                Some(PortFlag::TerminateSession) => self.close(CloseCause::AgentTerminated, None),
                _ => self.stats.ignored_messages += 1,
            },
            _ => self.stats.ignored_messages += 1,
        }
    }

    fn on_handshake_request(&mut self, now: Instant, payload: &[u8]) {
        if !matches!(self.state, State::AwaitingHandshake { .. }) {
            self.stats.ignored_messages += 1;
            return;
        }
        let request = match serde_json::from_slice::<HandshakeRequest>(payload) {
            Ok(request) => request,
            Err(e) => {
                self.close(CloseCause::HandshakeInvalid(e.to_string()), None);
                return;
            }
        };
        if let State::AwaitingHandshake { deadline } = self.state {
            self.state = State::AwaitingComplete { deadline };
        }
        let kms_key = request.kms_key_id().filter(|_| self.config.shell);
        self.request = Some(request);
        match kms_key {
            // The answer waits for the data key; the handshake's deadline still runs.
            Some(key_id) => {
                self.data_key_pending = true;
                self.events.push_back(Event::DataKeyRequired { key_id });
            }
            None => self.respond(now, None),
        }
    }

    /// Sends the HandshakeResponse, with the KMSEncryption action's result when there is one.
    fn respond(&mut self, now: Instant, kms: Option<Result<serde_json::Value, String>>) {
        let Some(request) = &self.request else {
            return;
        };
        let response = request.response(&self.config.client_version, kms);
        let body = Bytes::from(serde_json::to_vec(&response).unwrap_or_default());
        self.push_sequenced(now, PayloadType::HandshakeResponse, body);
    }

    /// The data key for a shell's KMS encryption ([`Event::DataKeyRequired`]), or why there is
    /// none: the HandshakeResponse goes out with it (the agent then fails the session when
    /// there is none, and says why in `channel_closed`).
    pub fn provide_data_key(&mut self, now: Instant, key: Result<DataKey, String>) {
        if !std::mem::take(&mut self.data_key_pending) {
            return;
        }
        let result = key.and_then(|key| {
            let cipher =
                Cipher::new(&key.plaintext, self.nonce_start).map_err(|e| e.to_string())?;
            self.cipher = Some(cipher);
            Ok(kms::action_result(&key))
        });
        self.respond(now, Some(result));
    }

    pub(super) fn open(&mut self, now: Instant, customer_message: Option<String>) {
        let agent_version = self.request.as_ref().map(|r| r.agent_version.clone());
        let properties = self
            .request
            .as_ref()
            .map(HandshakeRequest::session_properties)
            .unwrap_or_default();
        let above = |threshold: &str| {
            agent_version
                .as_deref()
                .is_some_and(|v| Version::above(v, threshold))
        };
        let mux = properties.session_type.as_deref() == Some("Port")
            && properties.port_type.as_deref() == Some("LocalPortForwarding")
            && above(agent_version::MUX_ABOVE_AGENT);
        let smux_keepalive = mux && !above(agent_version::KEEPALIVE_OFF_ABOVE_AGENT);
        let info = HandshakeInfo {
            terminate_flag_supported: above(agent_version::TERMINATE_FLAG_ABOVE_AGENT),
            agent_version,
            properties,
            mode: if mux {
                ForwardingMode::Mux
            } else {
                ForwardingMode::Basic
            },
            smux_keepalive,
            customer_message,
        };
        if mux {
            self.mux = Some(MuxClient::new(now, smux_keepalive, self.config.max_streams));
        }
        self.events
            .push_back(Event::HandshakeComplete(info.clone()));
        self.stats.handshakes_completed += 1;
        self.info = Some(info);
        self.state = State::Open;
    }

    fn deliver(&mut self, payload: Bytes) {
        if let Some(mux) = &mut self.mux {
            let mut events = Vec::new();
            let result = mux.feed(&payload, &mut events);
            self.push_mux_events(events);
            if let Err(e) = result {
                self.close(CloseCause::MuxProtocol(e), None);
            }
        } else if !payload.is_empty() {
            self.stats.bytes_received += payload.len() as u64;
            self.event_bytes += payload.len();
            self.events.push_back(Event::Data(payload));
        }
    }

    pub(super) fn push_mux_events(&mut self, events: Vec<MuxEvent>) {
        for event in events {
            match event {
                MuxEvent::Data(stream, data) => {
                    self.stats.bytes_received += data.len() as u64;
                    self.event_bytes += data.len();
                    self.events.push_back(Event::StreamData { stream, data });
                }
                MuxEvent::Closed(stream, reason) => {
                    self.events
                        .push_back(Event::StreamClosed { stream, reason });
                }
            }
        }
    }
}
