//! A Standard_Stream session behind the agent: no handshake unless the document names a KMS
//! key (`sessionplugin.go`: the shell plugin does not require one), the shell's task started
//! at once, the client's Output and Size payloads into its terminal (refused, unacknowledged,
//! until the terminal exists; a Size the agent cannot decode is never acknowledged), its
//! output to the client, and the session's end once the transcript has gone where the
//! document says.

use super::*;
use crate::shell::process::{self, ShellEvent, ShellInput, ShellSetup};
use crate::shell::transcript::{self, EventContext};
use crate::shell::{ShellInputs, logs::Uploader};

/// The shell behind the session.
pub(super) struct ShellPort {
    /// The terminal's input, once the shell runs; dropping it cancels the shell.
    pub(super) input: Option<UnboundedSender<ShellInput>>,
}

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
        if !inputs.kms_key_id.is_empty() {
            self.end(
                SessionStatus::Failed,
                format!(
                    "the document asks for KMS encryption (kmsKeyId {}), which the emulator does not run yet",
                    inputs.kms_key_id
                ),
                false,
            );
            return;
        }
        self.handshake = Handshake::Skipped;
        self.set_transfer(Transfer::Shell);
        self.last_activity = Instant::now();
        let config = &self.shared.config;
        let setup = ShellSetup {
            context: EventContext {
                region: config.region.clone(),
                target: self.info.instance.id.clone(),
                owner_arn: self.info.owner.clone(),
                run_as_user: String::new(),
                session_id: self.info.id.clone(),
            },
            uploader: config
                .upstream
                .as_deref()
                .map(|u| Arc::new(Uploader::new(u, &config.region))),
            mode: self.mode,
            inputs,
        };
        process::spawn(setup, self.transport.clone(), self.inbox.clone());
        self.port = PortState::Shell(ShellPort { input: None });
        self.transcript_pending = true;
    }

    /// Client Output for the terminal.
    pub(super) fn shell_keys(&mut self, data: &[u8]) -> Processed {
        let PortState::Shell(ShellPort { input: Some(input) }) = &self.port else {
            return Processed::NotReady;
        };
        let _ = input.send(ShellInput::Keys(self.target_backlog.hold(data.to_vec())));
        self.last_activity = Instant::now();
        lock(&self.report).bytes_from_client += data.len() as u64;
        Processed::Done
    }

    /// A client Size payload: the terminal's new size.
    pub(super) fn shell_size(&mut self, m: &ClientMessage) -> Processed {
        if self.is_closing() {
            return Processed::Done;
        }
        let PortState::Shell(ShellPort { input: Some(input) }) = &self.port else {
            return Processed::NotReady;
        };
        match transcript::parse_size(&m.payload) {
            Ok((cols, rows)) => {
                let _ = input.send(ShellInput::Resize { cols, rows });
                self.last_activity = Instant::now();
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
            ShellEvent::Started { input, run_as_user } => {
                lock(&self.report).run_as_user = Some(run_as_user);
                if let PortState::Shell(shell) = &mut self.port {
                    shell.input = Some(input);
                }
            }
            ShellEvent::Output { data, room } => {
                if !self.is_closing() {
                    self.send_stream(payload_type::OUTPUT, data, Some(room));
                }
            }
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
