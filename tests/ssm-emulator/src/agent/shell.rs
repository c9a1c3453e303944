//! A Standard_Stream session behind the agent: no handshake unless the document names a KMS
//! key (`sessionplugin.go`: the shell plugin does not require one), then the shell's task
//! started at once; with a key, the handshake with SessionType and KMSEncryption, the client's
//! data key decrypted with KMS, the encryption challenge, and only then the shell, every
//! Output payload encrypted both ways. The client's Output and Size payloads go into its
//! terminal (refused, unacknowledged, until the terminal exists; a Size the agent cannot
//! decode is never acknowledged), its output to the client, and the session ends once the
//! transcript has gone where the document says.

use super::*;
use crate::shell::encryption::{self, AgentCipher};
use crate::shell::process::{ShellEvent, ShellInput, ShellSetup};
use crate::shell::transcript::{self, EventContext};
use crate::shell::{ShellInputs, aws::AgentAws};

/// The shell behind the session.
pub(super) struct ShellPort {
    /// The shell runs: its terminal takes input.
    pub(super) running: bool,
    /// What starts the shell, until the KMS handshake has completed.
    pending: Option<ShellSetup>,
    kms: Kms,
}

/// Where a shell session's KMS encryption is.
enum Kms {
    /// The document names no key.
    Off,
    /// The HandshakeRequest went out with `challenge` (the KMSEncryption action's random
    /// `Challenge`); the client's data key is to come.
    AwaitingKey { challenge: String },
    /// KMS is decrypting the client's data key.
    Decrypting,
    /// The challenge went out at `sent`; its answer is to come.
    Challenging {
        cipher: AgentCipher,
        secret: Vec<u8>,
        sent: Instant,
    },
    /// Every Output payload is encrypted.
    On(AgentCipher),
}

/// What the agent tells the client once the challenge is answered.
const ENCRYPTED_SESSION_MESSAGE: &str = "This session is encrypted using AWS KMS.";

impl Agent {
    fn shell_inputs(&self) -> Option<&ShellInputs> {
        match &self.info.kind {
            SessionKind::Shell(inputs) => Some(inputs),
            SessionKind::Port(_) => None,
        }
    }

    /// Starts a shell session on the client's first connection.
    pub(super) fn start_shell(&mut self) {
        let Some(inputs) = self.shell_inputs().cloned() else {
            return;
        };
        self.set_transfer(Transfer::Shell);
        self.last_activity = self.now;
        let config = &self.shared.config;
        let setup = ShellSetup {
            context: EventContext {
                region: config.region.clone(),
                target: self.info.instance.id.clone(),
                owner_arn: self.info.owner.clone(),
                run_as_user: String::new(),
                session_id: self.info.id.clone(),
            },
            aws: config
                .upstream
                .as_deref()
                .map(|u| Arc::new(AgentAws::new(u, &config.region))),
            mode: self.mode,
            inputs,
        };
        if setup.inputs.kms_key_id.is_empty() {
            self.handshake = Handshake::SkipPending { first_output: None };
            self.port = PortState::Shell(Box::new(ShellPort {
                running: false,
                pending: None,
                kms: Kms::Off,
            }));
            self.spawn_shell(setup);
            return;
        }
        let challenge = encryption::handshake_challenge();
        let request = HandshakeRequest {
            agent_version: self.info.instance.agent_version.clone(),
            requested_client_actions: vec![
                RequestedClientAction {
                    action_type: "SessionType".to_owned(),
                    action_parameters: serde_json::json!({
                        "SessionType": "Standard_Stream",
                        "Properties": null,
                    }),
                },
                RequestedClientAction {
                    action_type: "KMSEncryption".to_owned(),
                    action_parameters: serde_json::json!({
                        "KMSKeyId": setup.inputs.kms_key_id,
                        "Challenge": challenge,
                    }),
                },
            ],
        };
        self.request_handshake(&request);
        self.port = PortState::Shell(Box::new(ShellPort {
            running: false,
            pending: Some(setup),
            kms: Kms::AwaitingKey { challenge },
        }));
    }

    fn spawn_shell(&mut self, setup: ShellSetup) {
        self.effects.push(Effect::StartShell(Box::new(setup)));
        self.transcript_pending = true;
    }

    fn shell_port(&mut self) -> Option<&mut ShellPort> {
        match &mut self.port {
            PortState::Shell(shell) => Some(shell.as_mut()),
            _ => None,
        }
    }

    /// The client's HandshakeResponse to a KMS shell's request, both actions processed and
    /// successful: the KMSEncryption one carries the data key, which KMS then decrypts
    /// (`Decrypt` under the document's key, with the session's encryption context, and the
    /// request's challenge in it when the client acknowledged it). The agent takes one
    /// response: a second one blocks its receive path until the handshake times out.
    pub(super) fn on_shell_handshake_response(&mut self, response: HandshakeResponse) {
        let Some(Kms::AwaitingKey { challenge }) = self.shell_port().map(|s| &s.kms) else {
            self.violation(
                "a second HandshakeResponse during the KMS handshake: the agent's receive path blocks on it until the handshake times out".to_owned(),
            );
            return;
        };
        let challenge = challenge.clone();
        lock(&self.report).client_version = Some(response.client_version.clone());
        let result = (response.processed_client_actions.iter())
            .find(|a| a.action_type == "KMSEncryption")
            .map(|a| &a.action_result);
        let blob = (result.and_then(|r| r.get("KMSCipherTextKey")))
            .and_then(serde_json::Value::as_str)
            .and_then(|k| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(k).ok()
            });
        let Some(blob) = blob else {
            self.violation(
                "the KMSEncryption action's result has no base64 KMSCipherTextKey".to_owned(),
            );
            return;
        };
        // The agent unmarshals the result into a bool field: anything else fails the
        // handshake. True puts the request's challenge into the encryption context.
        let acknowledged = match result.and_then(|r| r.get("ChallengeAcknowledgement")) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(acknowledged)) => *acknowledged,
            Some(other) => {
                self.violation(format!(
                    "the KMSEncryption action's ChallengeAcknowledgement is {other}, not a JSON boolean"
                ));
                return;
            }
        };
        let setup = self.shell_port().and_then(|s| s.pending.as_ref());
        let aws = setup.and_then(|setup| setup.aws.clone());
        let key_id = setup
            .map(|s| s.inputs.kms_key_id.clone())
            .unwrap_or_default();
        if let Some(shell) = self.shell_port() {
            shell.kms = Kms::Decrypting;
        }
        self.effects.push(Effect::DecryptDataKey {
            aws,
            blob,
            context: DataKeyContext {
                key_id,
                session: self.info.id.clone(),
                target: self.info.instance.id.clone(),
                random_challenge: acknowledged.then_some(challenge),
            },
        });
    }

    /// Whether this is a KMS shell whose handshake has not completed.
    pub(super) fn kms_handshake(&self) -> bool {
        matches!(&self.port, PortState::Shell(shell) if !matches!(shell.kms, Kms::Off | Kms::On(_)))
    }

    /// Whether KMS is decrypting the client's data key.
    pub(super) fn decrypting_data_key(&self) -> bool {
        matches!(&self.port, PortState::Shell(shell) if matches!(shell.kms, Kms::Decrypting))
    }

    /// KMS decrypted the client's data key (or could not): the HandshakeResponse is
    /// acknowledged, racing the challenge that goes out.
    fn on_data_key(&mut self, key: Result<Vec<u8>, String>) {
        let response = self.response_to_ack.take();
        if self.is_closing() {
            return;
        }
        let ack_first = self.handshake_ack_first || key.is_err();
        if let Some(response) = response.as_ref().filter(|_| ack_first) {
            self.ack(response);
        }
        let cipher = key.and_then(|k| AgentCipher::new(&k));
        let mut cipher = match cipher {
            Ok(cipher) => cipher,
            Err(e) => {
                self.end(
                    SessionStatus::Failed,
                    format!("Encountered error while initiating handshake. Fetching data key failed: {e}"),
                    false,
                );
                return;
            }
        };
        let (secret, request) = cipher.challenge();
        let sent = self.now;
        if let Some(shell) = self.shell_port() {
            shell.kms = Kms::Challenging {
                cipher,
                secret,
                sent,
            };
        }
        self.send_stream(payload_type::ENC_CHALLENGE_REQUEST, request, None);
        if let Some(response) = response.as_ref().filter(|_| !ack_first) {
            self.ack(response);
        }
    }

    /// The client's EncChallengeResponse: right, and the handshake completes and the shell
    /// starts; wrong, and the session fails.
    pub(super) fn on_challenge_response(&mut self, m: &ClientMessage) -> Processed {
        let Some(shell) = self.shell_port() else {
            self.violation("EncChallengeResponse in a session without KMS".to_owned());
            return Processed::Done;
        };
        if !matches!(shell.kms, Kms::Challenging { .. }) {
            self.violation(format!(
                "EncChallengeResponse (seq {}) without an EncChallengeRequest",
                m.sequence_number
            ));
            return Processed::Done;
        }
        let Kms::Challenging { cipher, secret, .. } = std::mem::replace(&mut shell.kms, Kms::Off)
        else {
            return Processed::Done;
        };
        if let Err(e) = cipher.answers(&secret, &m.payload) {
            self.violation(e);
            return Processed::Done;
        }
        let pending = self.shell_port().and_then(|s| {
            s.kms = Kms::On(cipher);
            s.pending.take()
        });
        let Handshake::Awaiting { since } = self.handshake else {
            return Processed::Done;
        };
        self.complete_handshake(since, ENCRYPTED_SESSION_MESSAGE.to_owned());
        lock(&self.report).encrypted = true;
        if let Some(setup) = pending {
            self.spawn_shell(setup);
        }
        Processed::Done
    }

    /// When the encryption challenge went out, while its answer is awaited: the agent gives
    /// the client a fresh handshake timeout from then.
    pub(super) fn challenge_sent(&self) -> Option<Instant> {
        match &self.port {
            PortState::Shell(shell) => match shell.kms {
                Kms::Challenging { sent, .. } => Some(sent),
                _ => None,
            },
            _ => None,
        }
    }

    /// Output for the client, encrypted when the session is.
    fn shell_output(&mut self, data: Vec<u8>) -> Vec<u8> {
        match self.shell_port().map(|s| &mut s.kms) {
            Some(Kms::On(cipher)) => cipher.seal(&data),
            _ => data,
        }
    }

    /// Client Output for the terminal (decrypted first when the session is encrypted).
    pub(super) fn shell_keys(&mut self, m: &ClientMessage) -> Processed {
        let data = &m.payload;
        let PortState::Shell(shell) = &self.port else {
            return Processed::NotReady;
        };
        if !shell.running {
            return Processed::NotReady;
        }
        let keys = match &shell.kms {
            Kms::On(cipher) => match cipher.open(data) {
                Some(plain) => plain,
                None => {
                    self.violation(format!(
                        "Output (seq {}) does not decrypt with the session's data key",
                        m.sequence_number
                    ));
                    return Processed::Done;
                }
            },
            _ => data.clone(),
        };
        let keys = self.target_backlog.hold(keys);
        self.effects.push(Effect::ToShell(ShellInput::Keys(keys)));
        self.last_activity = self.now;
        lock(&self.report).bytes_from_client += data.len() as u64;
        Processed::Done
    }

    /// A client Size payload: the terminal's new size.
    pub(super) fn shell_size(&mut self, m: &ClientMessage) -> Processed {
        if self.is_closing() {
            return Processed::Done;
        }
        let PortState::Shell(shell) = &self.port else {
            return Processed::NotReady;
        };
        if !shell.running {
            return Processed::NotReady;
        }
        match transcript::parse_size(&m.payload) {
            Ok((cols, rows)) => {
                self.effects
                    .push(Effect::ToShell(ShellInput::Resize { cols, rows }));
                self.last_activity = self.now;
                lock(&self.report).terminal_sizes.push((cols, rows));
                Processed::Done
            }
            Err(e) => {
                // The agent returns the decoding error and never acknowledges the message:
                // the client's stream is stuck behind it.
                self.violation(format!(
                    "{e} (seq {}): the agent never acknowledges it",
                    m.sequence_number
                ));
                Processed::NotReady
            }
        }
    }

    pub(super) fn on_shell_event(&mut self, event: ShellEvent) {
        match event {
            ShellEvent::Started { run_as_user } => {
                lock(&self.report).run_as_user = Some(run_as_user);
                if let PortState::Shell(shell) = &mut self.port {
                    shell.running = true;
                }
            }
            ShellEvent::Output { data, room } => {
                if !self.is_closing() {
                    let payload = self.shell_output(data);
                    self.send_stream(payload_type::OUTPUT, payload, Some(room));
                }
            }
            ShellEvent::DataKey(key) => self.on_data_key(key),
            ShellEvent::Exited => self.shell_exited = true,
            ShellEvent::Failed { output } => {
                self.transcript_pending = false;
                self.end(SessionStatus::Failed, output, false);
            }
            ShellEvent::TranscriptDone(transcript) => {
                self.transcript_pending = false;
                lock(&self.report).transcript = Some(transcript);
                if self.shell_exited {
                    self.end(
                        SessionStatus::Terminated,
                        "the shell exited".to_owned(),
                        true,
                    );
                }
            }
        }
    }

    /// The service's limits on a shell session (idle without client input, total time), from
    /// its document, where it sets them.
    pub(super) fn shell_limits(&self) -> (Option<Duration>, Option<Duration>) {
        let minute = Config::duration(self.shared.config.session_minute_ms);
        let Some(inputs) = self.shell_inputs() else {
            return (None, None);
        };
        (
            inputs.idle_session_timeout_minutes.map(|m| minute * m),
            inputs.max_session_duration_minutes.map(|m| minute * m),
        )
    }
}
