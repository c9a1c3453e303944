//! A real terminal for tests: tmux on a private socket, running one command in a window of a
//! given size. A test types into it, reads its screen, resizes it, and reads the command's
//! exit status once it has exited. The tmux server ends with its one window, and at the
//! latest when the fixture is dropped.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::error::{FixtureError, FixtureResult};

/// One command in a tmux window.
pub struct Terminal {
    dir: tempfile::TempDir,
    socket: PathBuf,
    status: PathBuf,
}

fn io_error(context: &str) -> impl FnOnce(std::io::Error) -> FixtureError + '_ {
    move |source| FixtureError::Io {
        context: context.to_owned(),
        source,
    }
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

impl Terminal {
    /// Runs `command` (with `env` added) in a `cols` x `rows` window.
    pub fn start(
        command: &[String],
        env: &[(&str, &str)],
        cols: u16,
        rows: u16,
    ) -> FixtureResult<Self> {
        let dir = tempfile::tempdir().map_err(io_error("creating the terminal's directory"))?;
        let socket = dir.path().join("tmux.sock");
        let status = dir.path().join("exit-status");
        // The window closes when the command exits; its status stays behind in a file.
        let line = format!(
            "{}; echo $? > {}",
            command
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" "),
            shell_quote(&status.display().to_string())
        );
        let terminal = Self {
            dir,
            socket,
            status,
        };
        let mut new_session = terminal.tmux();
        new_session.args(["new-session", "-d", "-s", "test"]);
        new_session.args(["-x", &cols.to_string(), "-y", &rows.to_string()]);
        for (key, value) in env {
            new_session.args(["-e", &format!("{key}={value}")]);
        }
        new_session.args(["sh", "-c", &line]);
        terminal.run(new_session)?;
        Ok(terminal)
    }

    fn tmux(&self) -> Command {
        let mut tmux = Command::new("tmux");
        tmux.arg("-S").arg(&self.socket).args(["-f", "/dev/null"]);
        tmux.env_remove("TMUX").env("TERM", "xterm-256color");
        tmux.current_dir(self.dir.path());
        tmux
    }

    fn run(&self, mut command: Command) -> FixtureResult<Output> {
        let output = command.output().map_err(io_error("running tmux"))?;
        if !output.status.success() {
            return Err(FixtureError::CommandFailed {
                command: format!("{command:?}"),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(output)
    }

    /// Types `text` as keys, literally.
    pub fn type_text(&self, text: &str) -> FixtureResult<()> {
        let mut keys = self.tmux();
        keys.args(["send-keys", "-t", "test", "-l", text]);
        self.run(keys).map(drop)
    }

    /// Presses a named key (`Enter`, `C-c`).
    pub fn press(&self, key: &str) -> FixtureResult<()> {
        let mut keys = self.tmux();
        keys.args(["send-keys", "-t", "test", key]);
        self.run(keys).map(drop)
    }

    /// Pastes `file` into the window, as a terminal pastes (bracketed paste off).
    pub fn paste_file(&self, file: &std::path::Path) -> FixtureResult<()> {
        let mut load = self.tmux();
        load.args(["load-buffer", "-b", "paste"]).arg(file);
        self.run(load)?;
        let mut paste = self.tmux();
        paste.args(["paste-buffer", "-d", "-b", "paste", "-t", "test"]);
        self.run(paste).map(drop)
    }

    /// The screen and its scrollback, as text.
    pub fn screen(&self) -> FixtureResult<String> {
        let mut capture = self.tmux();
        capture.args(["capture-pane", "-p", "-J", "-S", "-", "-t", "test"]);
        let output = self.run(capture)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits until the screen satisfies `shows` (at most `limit`); the screen when it does,
    /// the last one seen as the error when it does not.
    pub async fn wait_for_screen(
        &self,
        limit: Duration,
        shows: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            match self.screen() {
                Ok(screen) if shows(&screen) => return Ok(screen),
                Ok(screen) => last = screen,
                // The window is gone: the command exited.
                Err(e) => return Err(format!("{last}\n({e})")),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last)
    }

    /// Resizes the window (the command gets SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) -> FixtureResult<()> {
        let mut resize = self.tmux();
        resize.args(["resize-window", "-t", "test"]);
        resize.args(["-x", &cols.to_string(), "-y", &rows.to_string()]);
        self.run(resize).map(drop)
    }

    /// Waits (at most `limit`) for the command to exit; its exit status.
    pub async fn wait_for_exit(&self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&self.status)
                && text.ends_with('\n')
            {
                return text.trim().parse().ok();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let mut kill = self.tmux();
        kill.arg("kill-server");
        let _ = kill.output();
    }
}
