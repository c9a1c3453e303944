//! The agent's driver: one task per session that owns everything the core leaves out — the
//! inbox, the sender of the client's current connection, the target tasks and their channels,
//! the shell, the clock. It hands the core each input with the time, wakes it at its next deadline or when
//! the targets drain, and performs the effects it asks for, in order.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Agent, AgentInput, Effect, ToClient};
use crate::config::Mode;
use crate::port::{self, MuxPlumbing, PortEvent, StreamInput, ToTarget, TransportBuffer};
use crate::registry::{SessionInfo, Shared};
use crate::report::SessionReport;
use crate::shell::process::{self, ShellEvent, ShellInput};

/// Starts the task of a new session's agent; it ends once the session is over.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    info: Arc<SessionInfo>,
    report: Arc<std::sync::Mutex<SessionReport>>,
    inbox: UnboundedSender<AgentInput>,
    inputs: UnboundedReceiver<AgentInput>,
) -> JoinHandle<()> {
    let io = Io {
        mode: shared.config.mode,
        transport: TransportBuffer::new(shared.config.gateway_buffer_bytes),
        inbox,
        client: None,
        basic: None,
        mux: None,
        streams: HashMap::new(),
        shell: None,
    };
    let agent = Agent::new(shared, info, report, Instant::now());
    tokio::spawn(run(agent, io, inputs))
}

/// Drives `agent` until the session is over: finished, and every WebSocket of it closed (so
/// that every frame it delivered has been checked). Then marks the session ended.
async fn run(mut agent: Agent, mut io: Io, mut inputs: UnboundedReceiver<AgentInput>) {
    while !agent.is_over() {
        let backlog = agent.target_backlog().clone();
        let deadline = agent.next_deadline();
        tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => {
                    if let AgentInput::Attach { conn_id, outbound } = &input {
                        io.client = Some((*conn_id, outbound.clone()));
                    }
                    agent.handle(input, Instant::now());
                }
                None => break,
            },
            () = sleep_until_some(deadline), if deadline.is_some() => {
                agent.on_deadline(Instant::now());
            }
            () = backlog.drained(), if agent.holds_frames() => {
                agent.on_backlog_drained(Instant::now());
            }
        }
        io.perform(agent.take_effects());
        io.keep_client(agent.connection());
    }
    let status = agent.shut_down(Instant::now());
    io.perform(agent.take_effects());
    agent.shared.mark_ended(&agent.info.id, status);
}

/// Sleeps until `deadline`; forever without one (the branch is disabled then).
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The basic connection's task and its writer.
struct Basic {
    task: JoinHandle<()>,
    writer: UnboundedSender<ToTarget>,
}

/// One smux stream's task (none when there was no target to dial) and its input.
struct Stream {
    task: Option<JoinHandle<()>>,
    input: UnboundedSender<StreamInput>,
}

/// What a session's I/O runs on.
struct Io {
    mode: Mode,
    transport: TransportBuffer,
    /// The agent's own inbox, for the tasks it starts.
    inbox: UnboundedSender<AgentInput>,
    /// The sender of the client's WebSocket output goes to. Dropped as soon as the agent no
    /// longer sends to it (replaced by a newer connection, detached, the session's end): its
    /// relay then ends once it has written what it holds, and what it cannot write any more
    /// is dropped, giving its room in the transport back.
    client: Option<(u32, UnboundedSender<ToClient>)>,
    basic: Option<Basic>,
    mux: Option<MuxPlumbing>,
    streams: HashMap<u32, Stream>,
    /// The shell's terminal; dropping it cancels the shell.
    shell: Option<UnboundedSender<ShellInput>>,
}

impl Io {
    /// Keeps the client's sender only while it is the agent's `current` connection.
    fn keep_client(&mut self, current: Option<u32>) {
        if self.client.as_ref().map(|(id, _)| *id) != current {
            self.client = None;
        }
    }

    fn report(&self, event: PortEvent) {
        let _ = self.inbox.send(AgentInput::Port(event));
    }

    fn perform(&mut self, effects: impl Iterator<Item = Effect>) {
        for effect in effects {
            self.perform_one(effect);
        }
    }

    fn perform_one(&mut self, effect: Effect) {
        match effect {
            Effect::Client { conn_id, item } => {
                if let Some((_, client)) = self.client.as_ref().filter(|(id, _)| *id == conn_id) {
                    let _ = client.send(item);
                }
            }
            Effect::DialBasic { generation, target } => {
                self.close_basic();
                let Some(addr) = target else {
                    self.report(PortEvent::BasicDialFailed {
                        generation,
                        error: "connection refused (no target configured for this port)".to_owned(),
                    });
                    return;
                };
                let (writer, writes) = mpsc::unbounded_channel();
                let task = port::spawn_basic(
                    addr,
                    generation,
                    writes,
                    self.mode,
                    self.transport.clone(),
                    self.inbox.clone(),
                );
                self.basic = Some(Basic { task, writer });
            }
            Effect::ToBasic(chunk) => {
                if let Some(basic) = &self.basic {
                    let _ = basic.writer.send(chunk);
                }
            }
            Effect::CloseBasic => self.close_basic(),
            Effect::StartMux => {
                self.mux = Some(MuxPlumbing::spawn(
                    self.mode,
                    self.transport.clone(),
                    self.inbox.clone(),
                ));
            }
            Effect::OpenStream { id, target } => {
                let (input, inputs) = mpsc::unbounded_channel();
                let task = match (target, &self.mux) {
                    (Some(addr), Some(mux)) => Some(port::spawn_mux_stream(
                        addr,
                        id,
                        mux,
                        inputs,
                        self.inbox.clone(),
                    )),
                    _ => {
                        self.report(PortEvent::MuxDialFailed {
                            stream_id: id,
                            error: "no target configured for this port".to_owned(),
                        });
                        None
                    }
                };
                self.streams.insert(id, Stream { task, input });
            }
            Effect::ToStream { id, input } => {
                if let Some(stream) = self.streams.get(&id) {
                    let _ = stream.input.send(input);
                }
            }
            Effect::ForgetStream { id } => {
                self.streams.remove(&id);
            }
            Effect::SmuxControl(frame) => {
                if let Some(mux) = &self.mux {
                    let _ = mux.control.send(frame);
                }
            }
            Effect::StartShell(setup) => {
                let (keys, typed) = mpsc::unbounded_channel();
                process::spawn(*setup, typed, self.transport.clone(), self.inbox.clone());
                self.shell = Some(keys);
            }
            Effect::ToShell(input) => {
                if let Some(shell) = &self.shell {
                    let _ = shell.send(input);
                }
            }
            Effect::DecryptDataKey { aws, blob, context } => {
                let inbox = self.inbox.clone();
                tokio::spawn(async move {
                    let key = match aws {
                        Some(aws) => aws.decrypt_data_key(blob, &context).await,
                        None => Err("no upstream KMS to decrypt the data key with".to_owned()),
                    };
                    let _ = inbox.send(AgentInput::Shell(ShellEvent::DataKey(key)));
                });
            }
            Effect::StopTargets => {
                self.close_basic();
                for task in self.streams.drain().filter_map(|(_, s)| s.task) {
                    task.abort();
                }
                // Its tasks stop as it drops; dropping the terminal's input cancels the shell.
                self.mux = None;
                self.shell = None;
            }
        }
    }

    /// Stops the basic connection's reads; its writer shuts the write side down after what it
    /// holds.
    fn close_basic(&mut self) {
        if let Some(basic) = self.basic.take() {
            basic.task.abort();
        }
    }
}
