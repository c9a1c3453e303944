//! The handshake and its version gates, what each client message means once delivered in
//! order, and the flags.

use super::*;

/// How the agent fails a session whose HandshakeResponse does not come in time (the session
/// plugin prefixes every handshake error).
const HANDSHAKE_TIMED_OUT: &str = "Encountered error while initiating handshake. Handshake timed out. Please ensure that you have the latest version of the session manager plugin.";
/// How the agent fails a KMS session whose challenge is not answered in time.
const CHALLENGE_TIMED_OUT: &str =
    "Encountered error while initiating handshake. Timed out waiting for encryption challenge.";

impl Agent {
    pub(super) fn start_handshake(&mut self) {
        if self.faults.start_publication_first
            && self.send_control(&ClientMessage::new(
                MessageType::StartPublication,
                0,
                FLAG_SYN | FLAG_FIN,
                payload_type::UNSET,
                Vec::new(),
            ))
        {
            self.count(|f| f.early_start_publications += 1);
        }
        if self.faults.legacy_no_handshake {
            self.handshake = Handshake::Skipped;
            self.count(|f| f.handshakes_skipped += 1);
            self.set_transfer(Transfer::Basic);
            self.last_activity = self.now;
            if self.destination_allowed() {
                self.start_basic();
            }
            return;
        }
        let request = HandshakeRequest {
            agent_version: self.info.instance.agent_version.clone(),
            requested_client_actions: vec![RequestedClientAction {
                action_type: "SessionType".to_owned(),
                action_parameters: serde_json::json!({
                    "SessionType": "Port",
                    "Properties": self.info.port().map(|p| p.json.clone()),
                }),
            }],
        };
        self.request_handshake(&request);
    }

    /// Sends the HandshakeRequest; the handshake's timeout runs from now.
    pub(super) fn request_handshake(&mut self, request: &HandshakeRequest) {
        self.send_stream(
            payload_type::HANDSHAKE_REQUEST,
            serde_json::to_vec(request).unwrap_or_default(),
            None,
        );
        self.handshake = Handshake::Awaiting { since: self.now };
    }

    /// What the handshake waits for now and since when, with the agent's words when it waits
    /// too long: the HandshakeResponse (processed, its KMS decrypt included) from the
    /// request on; then, in a KMS shell, the answer to the encryption challenge, with a fresh
    /// timeout from the challenge on (`PerformHandshake`).
    pub(super) fn handshake_wait(&self) -> Option<(Instant, &'static str)> {
        let Handshake::Awaiting { since } = self.handshake else {
            return None;
        };
        Some(match self.challenge_sent() {
            Some(sent) => (sent, CHALLENGE_TIMED_OUT),
            None => (since, HANDSHAKE_TIMED_OUT),
        })
    }

    /// Sends HandshakeComplete (with the time since the request, and `customer_message`); the
    /// session is open from now.
    pub(super) fn complete_handshake(&mut self, since: Instant, customer_message: String) {
        let complete = HandshakeComplete {
            handshake_time_to_complete: self.now.saturating_duration_since(since).as_nanos() as i64,
            customer_message,
        };
        // Complete once the gateway has written it (`AgentInput::Written`), as the agent's
        // flag is set only when its write returns: what the client sends before it could have
        // seen HandshakeComplete is dropped.
        self.handshake = Handshake::CompleteSent { seq: self.next_seq };
        self.send_stream(
            payload_type::HANDSHAKE_COMPLETE,
            serde_json::to_vec(&complete).unwrap_or_default(),
            None,
        );
        self.last_activity = self.now;
    }

    /// Whether the agent's port session takes messages (its `IsConnectionAvailable`): the basic
    /// connection has been dialled once, or the mux is set up.
    pub(super) fn port_available(&self) -> bool {
        match &self.port {
            PortState::None => false,
            PortState::Basic(b) => !matches!(b.state, BasicState::Dialing),
            PortState::Mux(mx) => mx.ready,
            PortState::Shell(shell) => shell.running,
        }
    }

    pub(super) fn handshake_done(&self) -> bool {
        matches!(self.handshake, Handshake::Complete | Handshake::Skipped)
    }

    /// Whether the idle timeout runs: once no handshake is awaited (a shell without KMS waiting
    /// for its first Output to be written awaits none: the agent's idle timer runs then).
    pub(super) fn idle_timer_runs(&self) -> bool {
        self.handshake_done() || matches!(self.handshake, Handshake::SkipPending { .. })
    }

    /// How a message the agent drops because the handshake is not done came too early.
    fn too_early(&self) -> &'static str {
        match self.handshake {
            Handshake::CompleteSent { .. } => {
                "before HandshakeComplete reached the client (it was not written yet: the client cannot have seen it)"
            }
            Handshake::SkipPending { .. } => {
                "before the agent's first Output reached the client (a shell without KMS drops input until the agent has skipped its handshake, which the client cannot tell before that Output)"
            }
            _ => "before HandshakeComplete",
        }
    }

    pub(super) fn process(&mut self, m: &ClientMessage) -> Processed {
        match m.payload_type {
            payload_type::HANDSHAKE_RESPONSE => {
                self.on_handshake_response(&m.payload);
                Processed::Done
            }
            payload_type::OUTPUT => {
                if !self.handshake_done() {
                    self.violation(format!(
                        "Output (seq {}) {}; the agent discards it",
                        m.sequence_number,
                        self.too_early()
                    ));
                    return Processed::Done;
                }
                if matches!(self.info.kind, SessionKind::Shell(_)) && !self.is_closing() {
                    return self.shell_keys(m);
                }
                self.on_output(m.sequence_number, &m.payload)
            }
            payload_type::SIZE if matches!(self.info.kind, SessionKind::Shell(_)) => {
                if !self.handshake_done() {
                    self.violation(format!(
                        "Size (seq {}) {}; the agent discards it",
                        m.sequence_number,
                        self.too_early()
                    ));
                    return Processed::Done;
                }
                self.shell_size(m)
            }
            payload_type::ENC_CHALLENGE_RESPONSE
                if matches!(self.info.kind, SessionKind::Shell(_)) =>
            {
                self.on_challenge_response(m)
            }
            payload_type::FLAG if matches!(self.info.kind, SessionKind::Shell(_)) => {
                // The shell plugin acknowledges flags and ignores them: a client that ends a
                // shell with one waits for an end that never comes.
                self.violation(format!(
                    "Flag (seq {}) in a Standard_Stream session: the shell plugin ignores flags; end the session with TerminateSession",
                    m.sequence_number
                ));
                Processed::Done
            }
            payload_type::FLAG => {
                if !self.handshake_done() {
                    // The agent acknowledges it and drops it unread.
                    self.violation(format!(
                        "Flag (seq {}) {}; the agent drops it",
                        m.sequence_number,
                        self.too_early()
                    ));
                    return Processed::Done;
                }
                if !self.port_available() {
                    return Processed::NotReady;
                }
                if self.ending.is_some()
                    && message::parse_flag(&m.payload) == Some(flag::TERMINATE_SESSION)
                {
                    // A second TerminateSession (not a retransmission of the first): the
                    // agent's receive path hands it to a port session that no longer takes
                    // it, and blocks there; nothing after it is acknowledged.
                    return Processed::NotReady;
                }
                self.on_flag(&m.payload);
                Processed::Done
            }
            other => {
                let name = match other {
                    payload_type::SIZE => "Size (terminal size) in a Port session",
                    payload_type::ENC_CHALLENGE_RESPONSE => {
                        "EncChallengeResponse in a session without KMS"
                    }
                    _ => "an unexpected PayloadType",
                };
                self.violation(format!(
                    "client sent {name} (PayloadType {other}) as seq {}",
                    m.sequence_number
                ));
                Processed::Done
            }
        }
    }

    pub(super) fn on_handshake_response(&mut self, payload: &[u8]) {
        let Handshake::Awaiting { since } = self.handshake else {
            self.violation("HandshakeResponse outside the handshake".to_owned());
            return;
        };
        let response: HandshakeResponse = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                self.violation(format!("HandshakeResponse is not valid JSON: {e}"));
                self.end(
                    SessionStatus::Failed,
                    "invalid HandshakeResponse".to_owned(),
                    false,
                );
                return;
            }
        };
        if version::parse(&response.client_version).is_none() {
            self.violation(format!(
                "ClientVersion {:?} is not a dotted version",
                response.client_version
            ));
        }
        let shell = matches!(self.info.kind, SessionKind::Shell(_));
        let requested: &[&str] = if shell {
            &["SessionType", "KMSEncryption"]
        } else {
            &["SessionType"]
        };
        if !self.processed_as_requested(&response, requested) {
            return;
        }
        if shell {
            self.on_shell_handshake_response(response);
            return;
        }
        let client_version = response.client_version;
        let agent_version = self.info.instance.agent_version.clone();
        let mux = version::agent_uses_mux(
            &agent_version,
            &client_version,
            self.info.port().is_some_and(|p| p.local_port_forwarding),
        );
        let keepalive = mux && version::agent_smux_keepalive(&agent_version, &client_version);
        self.set_transfer(if mux { Transfer::Mux } else { Transfer::Basic });
        {
            let mut r = lock(&self.report);
            r.client_version = Some(client_version);
            r.smux_keepalive = keepalive;
            r.handshake_ack_first = self.handshake_ack_first;
        }
        self.complete_handshake(since, String::new());
        self.after_handshake_faults();
        match (self.destination_allowed(), mux) {
            (false, _) => {}
            (true, true) => self.start_mux(keepalive),
            (true, false) => self.start_basic(),
        }
    }

    /// Whether the HandshakeResponse processed exactly the `requested` actions (a violation
    /// otherwise) and all of them succeeded: the agent cancels the session for any other
    /// status (`handleHandshakeResponse`), in its words.
    fn processed_as_requested(&mut self, response: &HandshakeResponse, requested: &[&str]) -> bool {
        let actions = &response.processed_client_actions;
        let got: Vec<&str> = actions.iter().map(|a| a.action_type.as_str()).collect();
        if got != requested {
            self.violation(format!(
                "HandshakeResponse must process exactly {requested:?}, got {got:?}"
            ));
        }
        if self.is_closing() {
            // Failed by a violation above, or a late answer to a session that already ended.
            return false;
        }
        if let Some(bad) = actions.iter().find(|a| a.action_status != 1) {
            let reason = format!(
                "Encountered error while initiating handshake. {} failed on client with status {} error: {}",
                bad.action_type,
                bad.action_status,
                bad.error.clone().unwrap_or_default()
            );
            self.end(SessionStatus::Failed, reason, false);
            return false;
        }
        true
    }

    pub(super) fn on_flag(&mut self, payload: &[u8]) {
        let Some(value) = message::parse_flag(payload) else {
            self.violation(format!(
                "Flag payload of {} bytes, expected 4",
                payload.len()
            ));
            return;
        };
        match value {
            flag::DISCONNECT_TO_PORT => {
                if self.transfer != Some(Transfer::Basic) {
                    self.violation("DisconnectToPort flag outside basic mode".to_owned());
                    return;
                }
                if self.is_closing() {
                    return;
                }
                if !self.info.port().is_some_and(|p| p.local_port_forwarding) {
                    // An SSH session's agent closes the connection, its read fails, and the
                    // session fails: there is no reconnecting.
                    self.end(
                        SessionStatus::Failed,
                        "the client disconnected the port of an SSH session (DisconnectToPort)"
                            .to_owned(),
                        true,
                    );
                    return;
                }
                if let PortState::Basic(b) = &mut self.port {
                    b.state = BasicState::Idle;
                    self.effects.push(Effect::CloseBasic);
                }
            }
            flag::TERMINATE_SESSION => {
                if self.faults.ignore_terminate_flag {
                    self.count(|f| f.terminate_flags_ignored += 1);
                    return;
                }
                if !version::agent_supports_terminate_flag(&self.info.instance.agent_version) {
                    self.violation(format!(
                        "TerminateSession flag sent to agent {} (needs > 2.3.722.0)",
                        self.info.instance.agent_version
                    ));
                }
                self.end_after_ack(
                    SessionStatus::Terminated,
                    "client sent the TerminateSession flag".to_owned(),
                );
            }
            other => self.violation(format!("client sent Flag {other}")),
        }
    }
}
