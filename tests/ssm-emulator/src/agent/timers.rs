//! The agent's timers: retransmission checks, the handshake, reconnect and idle timeouts,
//! the client's sequence gaps, the smux keepalive and the closing drain, each a deadline; the
//! driver calls `on_deadline` at the earliest.

use super::*;

/// A deadline a moment past `since + after`: the checks fire once strictly past their limit.
fn past(since: Instant, after: Duration) -> Instant {
    since + after + Duration::from_millis(1)
}

impl Agent {
    /// When the oldest sent, unacknowledged message becomes due for a resend.
    fn resend_due(&self) -> Option<Instant> {
        self.conn_id?;
        if self.unacked.len() <= self.unsent {
            return None;
        }
        let last = self.unacked.front()?.last_sent?;
        Some(past(last, self.rto.rto()))
    }

    /// The resend check that will resend the oldest message: the first on the grid after the
    /// last check at which it is due.
    fn next_resend_check(&self) -> Option<Instant> {
        let due = self.resend_due()?;
        let after_last = self.resend_checked.map(|t| t + Duration::from_nanos(1));
        Some(self.on_resend_grid(after_last.map_or(due, |t| t.max(due))))
    }

    /// Resends the oldest message if a resend check is due now.
    fn check_resend(&mut self, now: Instant) {
        if self.next_resend_check().is_some_and(|at| now >= at) {
            self.resend_checked = Some(now);
            self.retransmit_head(now);
        }
    }

    /// The first resend check at or after `at`: the agent's scheduler looks only every
    /// [`TICK`], on a grid that input does not move.
    fn on_resend_grid(&self, at: Instant) -> Instant {
        let tick = TICK.as_nanos();
        let since = at.saturating_duration_since(self.resend_grid).as_nanos();
        let offset = u64::try_from(since.div_ceil(tick) * tick).unwrap_or(u64::MAX);
        self.resend_grid + Duration::from_nanos(offset)
    }

    /// When the task must next look at its timers: `None` once the session has ended. While
    /// output the client has not acknowledged is out, at the resend check where its oldest
    /// message is due (the agent's scheduler looks every [`TICK`]); otherwise at the earliest
    /// timeout, so that an idle session costs no wake-ups. Every deadline is absolute: a steady
    /// flow of input never postpones one.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.finished.is_some() {
            return None;
        }
        let resend = self.next_resend_check();
        if let Some(drain) = &self.ending {
            // Without a connection nothing can be acknowledged any more: end the drain now.
            let end = if self.conn_id.is_none() {
                self.now
            } else {
                drain.deadline
            };
            return Some(resend.map_or(end, |r| r.min(end)));
        }
        let config = &self.shared.config;
        let mut deadlines = vec![resend];
        if let Some((since, _)) = self.handshake_wait() {
            deadlines.push(Some(past(
                since,
                Config::duration(config.handshake_timeout_ms),
            )));
        }
        if let Some(since) = self.detached_since {
            deadlines.push(Some(past(
                since,
                Config::duration(config.reconnect_timeout_ms),
            )));
        }
        if self.idle_timer_runs() {
            deadlines.push(Some(past(self.last_activity, self.idle_limit())));
        }
        if let (Some(started), (_, Some(max))) = (self.started, self.shell_limits()) {
            deadlines.push(Some(past(started, max)));
        }
        if let Some(since) = self.gap_since
            && !self.gap_reported
        {
            let gap = Config::duration(config.sequence_gap_timeout_ms);
            deadlines.push(Some(past(since, gap)));
        }
        if let PortState::Mux(mx) = &self.port
            && mx.keepalive
        {
            let interval = Config::duration(config.smux_keepalive_interval_ms);
            let timeout = Config::duration(config.smux_keepalive_timeout_ms);
            deadlines.push(Some(mx.last_nop + interval));
            deadlines.push(Some(past(mx.last_rx, timeout)));
        }
        deadlines.into_iter().flatten().min()
    }

    /// How long the session may go without activity: a shell document's idleSessionTimeout,
    /// else the emulator's.
    fn idle_limit(&self) -> Duration {
        self.shell_limits()
            .0
            .unwrap_or_else(|| Config::duration(self.shared.config.idle_timeout_ms))
    }

    /// The time is `now`, at or past [`Agent::next_deadline`]: what is due happens.
    pub(crate) fn on_deadline(&mut self, now: Instant) {
        self.now = now;
        self.check_timers(now);
        self.release_held();
    }

    fn check_timers(&mut self, now: Instant) {
        if let Some(drain) = &self.ending {
            if now >= drain.deadline || self.conn_id.is_none() {
                self.finish_drain();
            } else {
                self.check_resend(now);
            }
            return;
        }
        self.check_resend(now);
        if self.is_closing() {
            return;
        }
        let shared = self.shared.clone();
        let config = &shared.config;
        if let Some((since, timed_out)) = self.handshake_wait()
            && now.duration_since(since) > Config::duration(config.handshake_timeout_ms)
        {
            self.end(SessionStatus::Failed, timed_out.to_owned(), false);
            return;
        }
        if let Some(since) = self.detached_since
            && now.duration_since(since) > Config::duration(config.reconnect_timeout_ms)
        {
            self.end(
                SessionStatus::Terminated,
                "the client did not reconnect".to_owned(),
                false,
            );
            return;
        }
        if let (Some(started), (_, Some(max))) = (self.started, self.shell_limits())
            && now.duration_since(started) > max
        {
            self.end(
                SessionStatus::Terminated,
                "Session max duration reached".to_owned(),
                false,
            );
            return;
        }
        // While the handshake runs, its own timeout applies.
        if self.idle_timer_runs() && now.duration_since(self.last_activity) > self.idle_limit() {
            self.end(
                SessionStatus::Terminated,
                "Session idle timeout".to_owned(),
                false,
            );
            return;
        }
        if let Some(since) = self.gap_since
            && !self.gap_reported
            && now.duration_since(since) > Config::duration(config.sequence_gap_timeout_ms)
        {
            self.gap_reported = true;
            let next = self
                .reorder
                .keys()
                .next()
                .copied()
                .unwrap_or(self.expected_seq);
            self.violation(format!(
                "client sequence gap: expected seq {} but only later ones (from {next}) arrived",
                self.expected_seq
            ));
            if self.is_closing() {
                return;
            }
        }
        let interval = Config::duration(config.smux_keepalive_interval_ms);
        let timeout = Config::duration(config.smux_keepalive_timeout_ms);
        let mut keepalive_dead = false;
        if let PortState::Mux(mx) = &mut self.port
            && mx.keepalive
        {
            if now.duration_since(mx.last_nop) >= interval {
                mx.last_nop = now;
                let nop = smux::Frame::control(smux::Command::Nop, 0).encode();
                self.effects.push(Effect::SmuxControl(nop));
                lock(&self.report).smux_nops_to_client += 1;
            }
            keepalive_dead = now.duration_since(mx.last_rx) > timeout;
        }
        // xtaci closes on its keepalive tick only while its receive buffer has room: a
        // stalled receive path reads nothing, and the client is not to blame.
        if self.receive_stalled() {
            if let PortState::Mux(mx) = &mut self.port {
                mx.last_rx = now;
            }
            keepalive_dead = false;
        }
        if keepalive_dead {
            self.end(
                SessionStatus::Failed,
                "smux keepalive timeout: nothing arrived from the client's smux".to_owned(),
                false,
            );
        }
    }
}
