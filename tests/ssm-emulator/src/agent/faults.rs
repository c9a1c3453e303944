//! Fault injection on a live session (docs/protocol.md §9.2): the faults a session's
//! configuration schedules after its handshake, and their counters in the report.

use super::*;

impl Agent {
    /// Counts an injected fault in the report.
    pub(super) fn count(&self, fault: impl FnOnce(&mut InjectedFaults)) {
        fault(&mut lock(&self.report).injected);
    }

    pub(super) fn after_handshake_faults(&mut self) {
        if self.faults.lasting_pause {
            let pause = ClientMessage::new(
                MessageType::PausePublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            if self.send_control(&pause) {
                self.count(|f| f.lasting_pauses += 1);
            }
        }
        if self.faults.garbage_publication {
            let pause = ClientMessage::new(
                MessageType::PausePublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            let mut bytes = pause.encode();
            // Garbage digest and a little-endian "length", as GIM observed.
            for b in &mut bytes[80..112] {
                *b = 0xA5;
            }
            bytes[116..120].copy_from_slice(&120u32.to_le_bytes());
            if self.send_to_client(ToClient::Frame {
                data: bytes.into(),
                stream: false,
                room: None,
                on_written: None,
            }) {
                self.count(|f| f.garbage_publications += 1);
            }
            let start = ClientMessage::new(
                MessageType::StartPublication,
                0,
                FLAG_SYN | FLAG_FIN,
                0,
                Vec::new(),
            );
            self.send_control(&start);
        }
        if self.faults.extra_message_types {
            let state = serde_json::json!({
                "SchemaVersion": 1, "SessionState": "Connected", "SessionId": self.info.id,
            });
            let extra = [
                ClientMessage::new(
                    MessageType::AgentSessionState,
                    0,
                    FLAG_SYN | FLAG_FIN,
                    0,
                    serde_json::to_vec(&state).unwrap_or_default(),
                ),
                ClientMessage::new(
                    MessageType::Other("future_message_type".to_owned()),
                    0,
                    0,
                    99,
                    b"ignore me".to_vec(),
                ),
            ];
            for m in &extra {
                if self.send_control(m) {
                    self.count(|f| f.extra_messages += 1);
                }
            }
        }
    }
}
