//! The reliability layer: numbering and sending the agent's stream (with the outgoing
//! buffer's limit), its retransmission with the agent's RTO, and receiving the client's:
//! acks, in-order delivery, reordering, duplicates and the strict checks on both (identical
//! retransmissions, acknowledged output, sequence gaps).

use super::*;

impl Agent {
    /// Sends one `output_stream_data` and keeps it for retransmission. Target output carries
    /// its `room` in the transport.
    pub(super) fn send_stream(
        &mut self,
        payload_type: u32,
        payload: Vec<u8>,
        room: Option<InTransit>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Handshake::SkipPending { first_output } = &mut self.handshake
            && first_output.is_none()
            && payload_type == payload_type::OUTPUT
        {
            *first_output = Some(seq);
        }
        let flags = if seq == 0 { FLAG_SYN } else { 0 };
        let mut output_len = 0;
        if payload_type == payload_type::OUTPUT {
            output_len = payload.len();
            self.last_activity = self.now;
            lock(&self.report).bytes_to_client += payload.len() as u64;
        }
        let m = ClientMessage::new(
            MessageType::OutputStreamData,
            seq,
            flags,
            payload_type,
            payload,
        );
        lock(&self.report).messages_to_client += 1;
        if self.unacked.len() >= OUTGOING_BUFFER_CAPACITY {
            // The agent sends it once and keeps it no more: if the client lost it, it is lost.
            if !self.outgoing_full_reported {
                self.outgoing_full_reported = true;
                self.violation(format!(
                    "the client left {OUTGOING_BUFFER_CAPACITY} messages unacknowledged: the agent keeps no more for retransmission"
                ));
            }
            let on_written = self.handshake.written_for(seq);
            self.send_to_client(ToClient::Frame {
                data: m.encode().into(),
                stream: true,
                room,
                on_written,
            });
            return;
        }
        self.unacked_output_bytes += output_len;
        {
            let mut r = lock(&self.report);
            r.peak_unacked_output_bytes = r
                .peak_unacked_output_bytes
                .max(self.unacked_output_bytes as u64);
        }
        self.unacked.push_back(Outgoing {
            seq,
            id: m.message_id,
            bytes: m.encode().into(),
            output_len,
            room,
            last_sent: None,
            retransmits: 0,
            client_frames_mark: None,
            reported: false,
        });
        self.unsent += 1;
        self.flush_unsent();
    }

    pub(super) fn flush_unsent(&mut self) {
        let Some(conn_id) = self.conn_id else { return };
        let now = self.now;
        let start = self.unacked.len() - self.unsent;
        for o in self.unacked.iter_mut().skip(start) {
            let item = ToClient::Frame {
                data: o.bytes.clone(),
                stream: true,
                room: o.room.take(),
                on_written: self.handshake.written_for(o.seq),
            };
            self.effects.push(Effect::Client { conn_id, item });
            o.last_sent = Some(now);
        }
        self.unsent = 0;
    }

    pub(super) fn ack(&mut self, m: &ClientMessage) {
        let ack = ClientMessage::acknowledge(&m.message_type, m.message_id, m.sequence_number);
        if self.send_control(&ack) {
            lock(&self.report).acks_to_client += 1;
        }
    }

    pub(super) fn on_client_frame(&mut self, conn_id: u32, data: &[u8], text: bool) {
        self.client_frames += 1;
        {
            let mut r = lock(&self.report);
            if self.is_closing() {
                r.client_frames_after_end += 1;
            }
            if self.latest_conn.is_some_and(|latest| conn_id < latest) {
                r.client_frames_on_replaced_connections += 1;
            }
        }
        if text {
            self.violation("text WebSocket frame after the open message".to_owned());
        }
        let frame = match message::decode(data) {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("undecodable client frame: {e}"));
                return;
            }
        };
        for issue in frame.strict_issues() {
            self.violation(issue);
        }
        if !frame.digest_valid() {
            // Not acked: the client must retransmit.
            return;
        }
        match frame.message.message_type {
            MessageType::InputStreamData => self.on_input(&frame.message, data),
            MessageType::Acknowledge => self.on_ack(&frame.message),
            ref other => {
                self.violation(format!("client sent a {} message", other.as_str()));
            }
        }
    }

    pub(super) fn on_ack(&mut self, m: &ClientMessage) {
        lock(&self.report).acks_from_client += 1;
        let content: AcknowledgeContent = match serde_json::from_slice(&m.payload) {
            Ok(c) => c,
            Err(e) => {
                self.violation(format!("acknowledge payload is not the §4.2 JSON: {e}"));
                return;
            }
        };
        if m.payload_type != payload_type::UNSET {
            self.violation(format!("acknowledge with PayloadType {}", m.payload_type));
        }
        if content.acknowledged_message_type != MessageType::OutputStreamData.as_str() {
            self.violation(format!(
                "acknowledge for message type {:?}",
                content.acknowledged_message_type
            ));
            return;
        }
        if !content.is_sequential_message {
            self.violation("acknowledge with IsSequentialMessage false".to_owned());
        }
        let seq = content.acknowledged_message_sequence_number;
        let sent = self.unacked.len() - self.unsent;
        match self.unacked.iter().take(sent).position(|o| o.seq == seq) {
            Some(i) => {
                let Some(o) = self.unacked.remove(i) else {
                    return;
                };
                if i > 0 {
                    lock(&self.report).out_of_order_acks_from_client += 1;
                }
                self.unacked_output_bytes -= o.output_len;
                if o.id.hyphenated().to_string() != content.acknowledged_message_id {
                    self.violation(format!(
                        "acknowledge for seq {seq} names message id {}, sent as {}",
                        content.acknowledged_message_id,
                        o.id.hyphenated()
                    ));
                }
                if let Some(t) = o.last_sent {
                    self.rto.sample(self.now.saturating_duration_since(t));
                }
            }
            None if seq >= self.next_seq
                || seq < 0
                || self.unacked.iter().skip(sent).any(|o| o.seq == seq) =>
            {
                self.violation(format!(
                    "acknowledge for seq {seq}, which the agent never sent"
                ));
            }
            None => lock(&self.report).repeated_acks_from_client += 1,
        }
        self.finish_drain_if_acknowledged();
    }

    pub(super) fn remember(&mut self, header: [u8; message::FRAME_HEADER_SIZE]) {
        self.seen.push_back(header);
        if self.seen.len() > SEEN_HEADERS {
            self.seen.pop_front();
            self.seen_base += 1;
        }
    }

    pub(super) fn check_identical(&mut self, seq: i64, header: &[u8; message::FRAME_HEADER_SIZE]) {
        let known = if seq >= self.seen_base {
            self.seen.get((seq - self.seen_base) as usize).copied()
        } else {
            None
        };
        let known = known.or_else(|| self.reorder.get(&seq).map(|b| b.header));
        if let Some(k) = known
            && &k != header
        {
            self.violation(format!(
                "client sent a different message under already-used seq {seq} (retransmissions must be byte-identical)"
            ));
        }
    }

    pub(super) fn on_input(&mut self, m: &ClientMessage, raw: &[u8]) {
        let seq = m.sequence_number;
        lock(&self.report).messages_from_client += 1;
        let mut header = [0u8; message::FRAME_HEADER_SIZE];
        let n = raw.len().min(message::FRAME_HEADER_SIZE);
        header[..n].copy_from_slice(&raw[..n]);
        if seq < 0 {
            self.violation(format!("negative sequence number {seq}"));
            return;
        }
        if self.lost_input.remove(&seq) {
            lock(&self.report).lost_input_resent += 1;
        }
        if seq < self.expected_seq || self.reorder.contains_key(&seq) {
            lock(&self.report).duplicates_from_client += 1;
            self.check_identical(seq, &header);
            self.ack(m); // the agent re-acks duplicates
            return;
        }
        if seq > self.expected_seq {
            if self.reorder.len() >= REORDER_LIMIT {
                return; // dropped without an ack, like the agent
            }
            self.reorder.insert(
                seq,
                Buffered {
                    message: m.clone(),
                    header,
                },
            );
            self.ack(m);
            if self.gap_since.is_none() {
                self.gap_since = Some(self.now);
            }
            return;
        }
        // The real agent acks a HandshakeResponse on its receive path after handing it to its
        // handshake task, which sends HandshakeComplete: the two race for the WebSocket, and
        // either may go first (`Config::handshake_ack`). (The official plugin's mux session
        // crashes its reader on a message that arrives between HandshakeComplete and its mux
        // setup, such as the ack coming second.) It is never withheld.
        let handshake_response = m.payload_type == payload_type::HANDSHAKE_RESPONSE;
        let kms_shell = self.kms_handshake();
        // In a KMS shell the agent acks the EncChallengeResponse as it hands it over, racing
        // the HandshakeComplete it sends; the HandshakeResponse once KMS has answered.
        let acked_early = self.handshake_ack_first
            && ((handshake_response && !kms_shell)
                || m.payload_type == payload_type::ENC_CHALLENGE_RESPONSE);
        if acked_early {
            self.ack(m);
        }
        match self.process(m) {
            Processed::NotReady => {}
            Processed::Done => {
                self.in_order_accepted += 1;
                let withhold = !handshake_response
                    && self.faults.withhold_ack_every.is_some_and(|n| {
                        n > 0 && self.in_order_accepted.is_multiple_of(u64::from(n))
                    });
                if !acked_early {
                    if withhold {
                        self.count(|f| f.acks_withheld += 1);
                    } else if handshake_response && self.decrypting_data_key() {
                        self.response_to_ack = Some(m.clone());
                    } else {
                        self.ack(m);
                    }
                }
                self.remember(header);
                self.expected_seq += 1;
                self.gap_since = None;
                self.drain_reorder();
                // Its ack is out: a session ending on it may close now.
                if self.ending.is_some() {
                    self.finish_drain_if_acknowledged();
                }
            }
        }
    }

    pub(super) fn drain_reorder(&mut self) {
        let before = self.expected_seq;
        while let Some(b) = self.reorder.remove(&self.expected_seq) {
            match self.process(&b.message) {
                Processed::NotReady => {
                    self.reorder.insert(self.expected_seq, b);
                    break;
                }
                Processed::Done => {
                    self.remember(b.header);
                    self.expected_seq += 1;
                }
            }
        }
        if self.reorder.is_empty() {
            self.gap_since = None;
        } else if self.expected_seq != before || self.gap_since.is_none() {
            self.gap_since = Some(self.now);
        }
    }

    pub(super) fn retransmit_head(&mut self, now: Instant) {
        let Some(conn_id) = self.conn_id else { return };
        let sent = self.unacked.len() - self.unsent;
        if sent == 0 {
            return;
        }
        let rto = self.rto.rto();
        let limit = self.shared.config.unacked_retransmit_limit;
        let client_frames = self.client_frames;
        let Some(head) = self.unacked.front_mut() else {
            return;
        };
        let Some(last) = head.last_sent else { return };
        if now.duration_since(last) <= rto {
            return;
        }
        let on_written = self.handshake.written_for(head.seq);
        let item = ToClient::Frame {
            data: head.bytes.clone(),
            stream: true,
            room: None,
            on_written,
        };
        self.effects.push(Effect::Client { conn_id, item });
        head.last_sent = Some(now);
        head.retransmits += 1;
        if head.retransmits == limit / 2 {
            head.client_frames_mark = Some(client_frames);
        }
        let overdue = head.retransmits >= limit
            && !head.reported
            && head.client_frames_mark.is_some_and(|m| client_frames > m);
        let seq = head.seq;
        let retransmits = head.retransmits;
        if overdue {
            head.reported = true;
        }
        lock(&self.report).retransmissions_to_client += 1;
        if overdue {
            self.violation(format!(
                "client never acknowledged output seq {seq} after {retransmits} retransmissions while it kept sending"
            ));
        }
    }
}
