//! The shell behind a Standard_Stream session, one task per session, as the agent's shell
//! plugin runs it: first its checks (the log group and bucket encryption the document asks
//! for, the runAs user), then `sh` on a pseudo-terminal with `TERM=xterm-256color` and the
//! profile typed in, its output read as the agent reads it (after a 1 s wait, 1,024 bytes then
//! a 1 ms pause in realistic mode) and recorded, streamed to CloudWatch Logs every second
//! where the document says so; when the shell exits or the session is cancelled, the
//! transcript goes where the document says (`logs`). The agent talks to it through
//! [`ShellInput`] and hears from it through [`ShellEvent`]; dropping the input sender cancels
//! the shell (SIGKILL, as the agent's `execCmd.Kill`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use super::aws::{AgentAws, LogGroup};
use super::transcript::{self, EventContext};
use super::{DEFAULT_RUN_AS_USER, ShellInputs};
use crate::agent::AgentInput;
use crate::config::Mode;
use crate::port::{InTransit, REALISTIC_CHUNK, REALISTIC_PAUSE, ToTarget, TransportBuffer};
use crate::report::TranscriptReport;

/// The agent's wait before its first read of the shell's output (`initialWaitSecond`).
const INITIAL_WAIT: Duration = Duration::from_secs(1);
/// How often streamed logs go out (`cloudwatchlogspublisher`'s ticker).
const STREAM_INTERVAL: Duration = Duration::from_secs(1);

/// `mgsConfig.CloudWatchEncryptionErrorMsg`.
pub(crate) const CLOUD_WATCH_ENCRYPTION_ERROR: &str = "We couldn't start the session because encryption is not set up on the selected CloudWatch Logs log group. Either encrypt the log group or choose an option to enable logging without encryption.";
/// `mgsConfig.S3EncryptionErrorMsg`.
pub(crate) const S3_ENCRYPTION_ERROR: &str = "We couldn't start the session because encryption is not set up on the selected Amazon S3 bucket. Either encrypt the bucket or choose an option to enable logging without encryption.";

/// What the agent hands the shell's task.
#[derive(Debug)]
pub(crate) enum ShellInput {
    /// Client Output: keystrokes for the terminal.
    Keys(ToTarget),
    /// A Size payload.
    Resize { cols: u32, rows: u32 },
}

/// What the shell's task tells the agent.
#[derive(Debug)]
pub(crate) enum ShellEvent {
    /// The shell runs: its terminal takes input from now on.
    Started { run_as_user: String },
    /// Terminal output for the client.
    Output { data: Vec<u8>, room: InTransit },
    /// The shell exited by itself (its terminal closed).
    Exited,
    /// The shell could not start; `output` is what the session fails with.
    Failed { output: String },
    /// The transcript went where the document says (the last event of the task).
    TranscriptDone(TranscriptReport),
    /// KMS decrypted the client's data key (a KMS handshake, before the shell).
    DataKey(Result<Vec<u8>, String>),
}

/// Everything the shell's task needs, fixed at its start.
pub(crate) struct ShellSetup {
    pub(crate) inputs: ShellInputs,
    pub(crate) context: EventContext,
    pub(crate) mode: Mode,
    pub(crate) aws: Option<Arc<AgentAws>>,
}

fn send(inbox: &UnboundedSender<AgentInput>, event: ShellEvent) -> bool {
    inbox.send(AgentInput::Shell(event)).is_ok()
}

/// Starts the shell's task: its terminal takes what arrives on `keys`; dropping their sender
/// cancels the shell.
pub(crate) fn spawn(
    setup: ShellSetup,
    keys: UnboundedReceiver<ShellInput>,
    transport: TransportBuffer,
    inbox: UnboundedSender<AgentInput>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut report = TranscriptReport::default();
        let plan = match check(&setup, &mut report).await {
            Ok(plan) => plan,
            Err(output) => {
                send(&inbox, ShellEvent::Failed { output });
                return;
            }
        };
        let mut context = setup.context.clone();
        context.run_as_user = plan.user.clone();
        let recorded = match run(
            &setup,
            &plan,
            &context,
            keys,
            transport,
            &inbox,
            &mut report,
        )
        .await
        {
            Ok(recorded) => recorded,
            Err(output) => {
                send(&inbox, ShellEvent::Failed { output });
                return;
            }
        };
        finish_logging(&setup, &plan, &context, &recorded, &mut report).await;
        send(&inbox, ShellEvent::TranscriptDone(report));
    })
}

/// What the checks decided: who the shell runs as and where its transcript goes.
struct Plan {
    user: String,
    /// The log group, when it exists (the agent never creates one).
    log_group: Option<String>,
}

/// The shell plugin's checks before the terminal starts (`validate`, `StartCommandExecutor`):
/// the log group (a missing one means no CloudWatch logging; one the document wants
/// encrypted must have a KMS key), the bucket's default encryption when the document wants
/// it, and the runAs user.
async fn check(setup: &ShellSetup, report: &mut TranscriptReport) -> Result<Plan, String> {
    let inputs = &setup.inputs;
    let mut log_group = None;
    if !inputs.cloud_watch_log_group_name.is_empty() {
        let group = &inputs.cloud_watch_log_group_name;
        let state = match &setup.aws {
            Some(u) => u.log_group(group).await,
            None => LogGroup::Missing,
        };
        if inputs.cloud_watch_encryption_enabled && state != (LogGroup::Present { encrypted: true })
        {
            return Err(CLOUD_WATCH_ENCRYPTION_ERROR.to_owned());
        }
        match state {
            LogGroup::Missing => report.notes.push(format!(
                "log group {group} does not exist: no CloudWatch logging"
            )),
            LogGroup::Present { .. } => log_group = Some(group.clone()),
        }
    }
    if inputs.s3_encryption_enabled && !inputs.s3_bucket_name.is_empty() {
        let algorithm = match &setup.aws {
            Some(u) => u.bucket_encryption(&inputs.s3_bucket_name).await,
            None => Err("no upstream to ask".to_owned()),
        };
        match algorithm {
            Err(e) => {
                return Err(format!(
                    "Couldn't start the session because we are unable to validate encryption on Amazon S3 bucket. Error: {e}"
                ));
            }
            Ok(Some(a)) if a == "aws:kms" || a == "AES256" => {}
            Ok(_) => return Err(S3_ENCRYPTION_ERROR.to_owned()),
        }
    }
    let user = if inputs.run_as_enabled {
        let user = inputs.run_as_default_user.trim();
        if user.is_empty() {
            return Err("Unable to start command: please set the RunAs default user\n".to_owned());
        }
        check_run_as_user(user)
            .await
            .map_err(|e| format!("Unable to start command: {e}\n"))?;
        user.to_owned()
    } else {
        DEFAULT_RUN_AS_USER.to_owned()
    };
    Ok(Plan { user, log_group })
}

/// The runAs user must exist (`id <user>`) and be neither uid nor gid 0. The emulator runs
/// the shell as itself: who the session would run as is reported, not switched to.
async fn check_run_as_user(user: &str) -> Result<(), String> {
    let id = |flag: &'static str| {
        let user = user.to_owned();
        async move {
            let out = tokio::process::Command::new("id")
                .args([flag, &user])
                .output()
                .await
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "failed to start pty since RunAs user {user} does not exist"
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
    };
    let (uid, gid) = (id("-u").await?, id("-g").await?);
    if uid == "0" || gid == "0" {
        return Err("invalid uid and gid".to_owned());
    }
    Ok(())
}

/// Runs the shell until its terminal closes (it exited, or the agent cancelled it), with its
/// output for the client, and returns the transcript: exactly what was sent.
async fn run(
    setup: &ShellSetup,
    plan: &Plan,
    context: &EventContext,
    keys: UnboundedReceiver<ShellInput>,
    transport: TransportBuffer,
    inbox: &UnboundedSender<AgentInput>,
    report: &mut TranscriptReport,
) -> Result<Vec<u8>, String> {
    let start_error = |e: pty_process::Error| format!("Unable to start command: {e}\n");
    let (pty, pts) = pty_process::open().map_err(start_error)?;
    // The agent's shell starts with every signal at its default, as the agent (a service) has
    // them; the emulator may run where SIGINT is ignored (a command started in the background
    // by a non-interactive shell), and an ignored signal is inherited: ^C would then reach no
    // one. `env --default-signal` resets them without unsafe code.
    let mut command = pty_process::Command::new("env")
        .args(["--default-signal", "sh"])
        .env("TERM", "xterm-256color")
        .env("HOME", format!("/home/{}", plan.user))
        .kill_on_drop(true);
    if std::env::var_os("LANG").is_none_or(|l| l.is_empty()) {
        command = command.env("LANG", "C.UTF-8");
    }
    let mut child = command.spawn(pts).map_err(start_error)?;
    let (mut reader, mut writer) = pty.into_split();
    let profile = &setup.inputs.shell_profile_linux;
    if !profile.trim().is_empty() {
        writer
            .write_all(format!("{profile}\n").as_bytes())
            .await
            .map_err(|e| format!("Encountered an error while executing shell profile: {e}"))?;
    }
    send(
        inbox,
        ShellEvent::Started {
            run_as_user: plan.user.clone(),
        },
    );
    // The terminal's writer: the client's keys and sizes, until the agent drops its sender.
    let mut typing = std::pin::pin!(type_into(writer, keys));
    let mut recorded = Vec::new();
    let mut streamed = 0;
    let streaming = setup.inputs.cloud_watch_streaming_enabled && plan.log_group.is_some();
    let mut ticks = tokio::time::interval(STREAM_INTERVAL);
    let chunk = match setup.mode {
        Mode::Realistic => REALISTIC_CHUNK,
        Mode::Fast => 32 * 1024,
    };
    let mut buf = vec![0; chunk];
    let mut first_read = match setup.mode {
        Mode::Realistic => Some(tokio::time::Instant::now() + INITIAL_WAIT),
        Mode::Fast => None,
    };
    // The writer comes back when the agent drops its sender; the terminal stays open until the
    // shell is gone, for only then does its read end.
    let mut kept_writer = None;
    loop {
        tokio::select! {
            () = async {
                match first_read {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => first_read = None,
            read = reader.read(&mut buf), if first_read.is_none() => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    recorded.extend_from_slice(&buf[..n]);
                    tokio::select! {
                        room = transport.reserve(n) => if let Some(room) = room {
                            send(inbox, ShellEvent::Output { data: buf[..n].to_vec(), room });
                        },
                        writer = &mut typing, if kept_writer.is_none() => {
                            kept_writer = Some(writer);
                            let _ = child.start_kill();
                        }
                    }
                    if setup.mode == Mode::Realistic {
                        tokio::time::sleep(REALISTIC_PAUSE).await;
                    }
                }
            },
            writer = &mut typing, if kept_writer.is_none() => {
                kept_writer = Some(writer);
                let _ = child.start_kill();
            }
            _ = ticks.tick(), if streaming => {
                streamed = stream(setup, plan, context, &recorded, streamed, false, report).await;
            }
        }
    }
    let cancelled = kept_writer.is_some();
    let _ = child.wait().await;
    if streaming {
        stream(setup, plan, context, &recorded, streamed, true, report).await;
    }
    if !cancelled {
        send(inbox, ShellEvent::Exited);
    }
    Ok(recorded)
}

/// Writes the client's keys and sizes into the terminal until the agent drops its sender;
/// returns the writer.
async fn type_into(
    mut writer: pty_process::OwnedWritePty,
    mut keys: UnboundedReceiver<ShellInput>,
) -> pty_process::OwnedWritePty {
    while let Some(input) = keys.recv().await {
        match input {
            ShellInput::Keys(k) => {
                // A terminal that takes no more input (the shell is exiting) drops the keys.
                let _ = writer.write_all(k.bytes()).await;
            }
            ShellInput::Resize { cols, rows } => {
                let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
                let _ = writer.resize(pty_process::Size::new(clamp(rows), clamp(cols)));
            }
        }
    }
    writer
}

/// Streams the whole lines recorded since `from` (everything at the end) as structured events;
/// returns how far the transcript has been streamed.
async fn stream(
    setup: &ShellSetup,
    plan: &Plan,
    context: &EventContext,
    recorded: &[u8],
    from: usize,
    at_end: bool,
    report: &mut TranscriptReport,
) -> usize {
    let (Some(uploader), Some(group)) = (&setup.aws, &plan.log_group) else {
        return from;
    };
    let pending = &recorded[from..];
    let upto = if at_end {
        pending.len()
    } else {
        pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1)
    };
    if upto == 0 {
        return from;
    }
    let text = String::from_utf8_lossy(&pending[..upto]);
    let events = transcript::streamed_events(context, &text, &event_time());
    if put(uploader, group, &context.session_id, events, report).await {
        from + upto
    } else {
        from
    }
}

async fn put(
    uploader: &AgentAws,
    group: &str,
    stream: &str,
    events: Vec<String>,
    report: &mut TranscriptReport,
) -> bool {
    if events.is_empty() {
        return true;
    }
    let result = match uploader.create_log_stream(group, stream).await {
        Ok(()) => uploader.put_events(group, stream, events).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(n) => {
            report.cloud_watch_events += n;
            true
        }
        Err(e) => {
            report.notes.push(format!("CloudWatch Logs: {e}"));
            false
        }
    }
}

fn event_time() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The end of the session's logging (`finishLogging`): the transcript made into a typescript
/// by `script`, as the agent makes it, uploaded to S3 and, when streaming was off, to
/// CloudWatch Logs as plain events.
async fn finish_logging(
    setup: &ShellSetup,
    plan: &Plan,
    context: &EventContext,
    recorded: &[u8],
    report: &mut TranscriptReport,
) {
    let inputs = &setup.inputs;
    let to_s3 = !inputs.s3_bucket_name.is_empty();
    let to_cloud_watch = plan.log_group.is_some() && !inputs.cloud_watch_streaming_enabled;
    if !to_s3 && !to_cloud_watch {
        return;
    }
    let Some(uploader) = &setup.aws else {
        report
            .notes
            .push("no upstream: the transcript was not uploaded".to_owned());
        return;
    };
    let typescript = match typescript(&context.session_id, recorded).await {
        Ok(t) => t,
        Err(e) => {
            report
                .notes
                .push(format!("unable to generate log data: {e}"));
            return;
        }
    };
    if to_s3 {
        let key = transcript::s3_key(&inputs.s3_key_prefix, &context.session_id);
        match uploader
            .put_object(&inputs.s3_bucket_name, &key, typescript.clone())
            .await
        {
            Ok(()) => report.s3_object = Some(format!("{}/{key}", inputs.s3_bucket_name)),
            Err(e) => report.notes.push(format!("S3: {e}")),
        }
    }
    if let (true, Some(group)) = (to_cloud_watch, &plan.log_group) {
        let events = transcript::plain_events(&String::from_utf8_lossy(&typescript));
        put(uploader, group, &context.session_id, events, report).await;
    }
}

/// `script <session>.log -c "cat <recorded>"`, as `generateLogData` runs it.
async fn typescript(session_id: &str, recorded: &[u8]) -> Result<Vec<u8>, String> {
    let dir = std::env::temp_dir().join(format!(
        "ssm-emulator-{session_id}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let ipc = dir.join("ipcTempFile.log");
        let log = dir.join(format!("{session_id}.log"));
        tokio::fs::write(&ipc, recorded)
            .await
            .map_err(|e| e.to_string())?;
        let status = tokio::process::Command::new("script")
            .arg(&log)
            .arg("-c")
            .arg(format!("cat {}", ipc.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| format!("script: {e}"))?;
        if !status.success() {
            return Err(format!("script exited with {status}"));
        }
        tokio::fs::read(&log).await.map_err(|e| e.to_string())
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}
