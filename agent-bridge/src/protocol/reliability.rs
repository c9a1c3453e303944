//! The reliability layer (docs/protocol.md §4): the outgoing send buffer with sequence
//! numbers, retransmission and RTT sampling, and the incoming reorder buffer.
//!
//! No clock and no I/O: every method that needs time takes `now`. Memory is bounded by the
//! limits the owner passes in; nothing unacked is ever evicted (the owner stops accepting local
//! data instead, docs/protocol.md §9.3 item 6).
//!
//! ```text
//!  send:     push(seq n) -> [unsent] --poll_transmit--> [in flight] --on_ack--> gone
//!                                          ^                  |
//!                                          +--- overdue (RTO) +   (or reconnect: requeue all)
//!  receive:  seq < expected -> Duplicate (re-ack)      seq == expected -> InOrder
//!            seq > expected -> Early (stored, acked) or NoRoom (dropped, not acked)
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::message::ClientMessage;
use super::rtt::RttEstimator;

// === SendBuffer ===

/// One sequenced message not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    /// The encoded frame; every retransmission sends these identical bytes.
    frame: Bytes,
    /// Payload bytes (what the window counts).
    payload_len: usize,
    /// When it was last handed to the transport; `None` until first sent.
    last_sent: Option<Instant>,
    /// How many times it was handed to the transport.
    transmissions: u32,
    /// True while it sits in the retransmit queue.
    queued: bool,
}

/// Outcome of an incoming acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// The sequence number was outstanding and is now released; carries the RTT sample when the
    /// message had been sent exactly once (Karn's rule).
    Released(Option<Duration>),
    /// Not outstanding (already acked, never sent, or unknown).
    Unknown,
}

/// Outgoing sequenced messages: numbering, transmission order and retransmission.
#[derive(Debug)]
pub(crate) struct SendBuffer {
    entries: BTreeMap<i64, Unacked>,
    next_seq: i64,
    /// Every seq at or above this (and below `next_seq`) has never been sent.
    next_unsent: i64,
    retransmit_queue: VecDeque<i64>,
    payload_bytes: usize,
    /// Earliest moment some in-flight message may be overdue. May be early (after acks); never late.
    deadline: Option<Instant>,
    rtt: RttEstimator,
    retransmissions: u64,
    /// Last moment the peer made progress: an ack released something, or the first message
    /// went in flight with nothing else outstanding.
    progress_at: Option<Instant>,
}

impl SendBuffer {
    pub(crate) fn new(rtt: RttEstimator) -> Self {
        Self {
            entries: BTreeMap::new(),
            next_seq: 0,
            next_unsent: 0,
            retransmit_queue: VecDeque::new(),
            payload_bytes: 0,
            deadline: None,
            rtt,
            retransmissions: 0,
            progress_at: None,
        }
    }

    /// The sequence number the next `push` gets.
    pub(crate) fn next_sequence(&self) -> i64 {
        self.next_seq
    }

    /// Allocates the next sequence number and stores the frame `encode(seq)` builds, in one step.
    pub(crate) fn push(&mut self, payload_len: usize, encode: impl FnOnce(i64) -> Bytes) -> i64 {
        let seq = self.next_seq;
        let frame = encode(seq);
        self.entries.insert(
            seq,
            Unacked {
                frame,
                payload_len,
                last_sent: None,
                transmissions: 0,
                queued: false,
            },
        );
        self.payload_bytes += payload_len;
        self.next_seq += 1;
        seq
    }

    /// True while some message has never been sent.
    pub(crate) fn has_unsent(&self) -> bool {
        self.next_unsent < self.next_seq
    }

    /// Messages not yet acknowledged (sent or not).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Payload bytes not yet acknowledged.
    pub(crate) fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// Hands out the next frame: queued retransmissions first (lowest seq first), then new ones.
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        while let Some(seq) = self.retransmit_queue.pop_front() {
            if let Some(entry) = self.entries.get_mut(&seq) {
                entry.queued = false;
                entry.last_sent = Some(now);
                entry.transmissions = entry.transmissions.saturating_add(1);
                self.retransmissions += 1;
                let frame = entry.frame.clone();
                self.arm(now);
                return Some(frame);
            }
        }
        while self.next_unsent < self.next_seq {
            let seq = self.next_unsent;
            self.next_unsent += 1;
            if !self.has_in_flight() {
                self.progress_at = Some(now);
            }
            if let Some(entry) = self.entries.get_mut(&seq) {
                entry.last_sent = Some(now);
                entry.transmissions = 1;
                let frame = entry.frame.clone();
                self.arm(now);
                return Some(frame);
            }
        }
        None
    }

    fn arm(&mut self, sent_at: Instant) {
        let due = sent_at + self.rtt.rto();
        self.deadline = Some(self.deadline.map_or(due, |d| d.min(due)));
    }

    /// Releases an acknowledged sequence number.
    pub(crate) fn on_ack(&mut self, now: Instant, seq: i64) -> AckOutcome {
        let Some(entry) = self.entries.get(&seq) else {
            return AckOutcome::Unknown;
        };
        let Some(last_sent) = entry.last_sent else {
            // An ack for something never sent cannot be genuine; ignore it.
            return AckOutcome::Unknown;
        };
        let sample = (entry.transmissions == 1).then(|| now.saturating_duration_since(last_sent));
        if let Some(entry) = self.entries.remove(&seq) {
            self.payload_bytes -= entry.payload_len;
        }
        self.progress_at = Some(now);
        if let Some(sample) = sample {
            self.rtt.on_sample(sample);
        }
        if self.entries.is_empty() {
            self.deadline = None;
        }
        AckOutcome::Released(sample)
    }

    fn has_in_flight(&self) -> bool {
        self.entries
            .values()
            .next()
            .is_some_and(|e| e.last_sent.is_some())
    }

    /// Since when sent messages have been waiting without any ack progress; `None` when
    /// nothing is in flight.
    pub(crate) fn waiting_since(&self) -> Option<Instant> {
        if self.has_in_flight() {
            self.progress_at
        } else {
            None
        }
    }

    /// The earliest retransmission deadline.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Queues every in-flight message whose RTO has expired; returns how many were queued.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> usize {
        match self.deadline {
            Some(deadline) if deadline <= now => {}
            _ => return 0,
        }
        let rto = self.rtt.rto();
        let mut queued = 0;
        let mut next: Option<Instant> = None;
        for (seq, entry) in &mut self.entries {
            let Some(last_sent) = entry.last_sent else {
                continue;
            };
            if entry.queued {
                continue;
            }
            let due = last_sent + rto;
            if due <= now {
                entry.queued = true;
                self.retransmit_queue.push_back(*seq);
                queued += 1;
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        if queued > 0 {
            self.rtt.on_timeout();
        }
        self.deadline = next;
        queued
    }

    /// After a transport change: every message that was in flight is sent again, in order.
    pub(crate) fn requeue_in_flight(&mut self, now: Instant) {
        self.progress_at = Some(now);
        self.retransmit_queue.clear();
        for (seq, entry) in &mut self.entries {
            if entry.last_sent.is_some() {
                entry.queued = true;
                self.retransmit_queue.push_back(*seq);
            }
        }
        self.deadline = None;
    }

    pub(crate) fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    pub(crate) fn retransmissions(&self) -> u64 {
        self.retransmissions
    }
}

// === ReceiveBuffer ===

/// Where an incoming sequenced message falls relative to the expected sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Already processed or already buffered: re-ack, do not process.
    Duplicate,
    /// The expected one.
    InOrder,
    /// Ahead of the expected one.
    Early,
}

/// Incoming sequenced messages: the expected counter and a bounded reorder buffer.
#[derive(Debug)]
pub(crate) struct ReceiveBuffer {
    expected: i64,
    reorder: BTreeMap<i64, ClientMessage>,
    reorder_bytes: usize,
    max_messages: usize,
}

impl ReceiveBuffer {
    pub(crate) fn new(max_messages: usize) -> Self {
        Self {
            expected: 0,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            max_messages,
        }
    }

    pub(crate) fn expected(&self) -> i64 {
        self.expected
    }

    pub(crate) fn classify(&self, seq: i64) -> Arrival {
        if seq < self.expected || self.reorder.contains_key(&seq) {
            Arrival::Duplicate
        } else if seq == self.expected {
            Arrival::InOrder
        } else {
            Arrival::Early
        }
    }

    /// True when one more early message may be stored.
    pub(crate) fn has_room(&self) -> bool {
        self.reorder.len() < self.max_messages
    }

    /// Stores an early message (the caller checked `classify` and `has_room`).
    pub(crate) fn store(&mut self, message: ClientMessage) {
        self.reorder_bytes += message.payload.len();
        self.reorder.insert(message.sequence_number, message);
    }

    /// Marks the expected message processed.
    pub(crate) fn advance(&mut self) {
        self.expected += 1;
    }

    /// Takes the buffered message that is now expected, if any.
    pub(crate) fn pop_ready(&mut self) -> Option<ClientMessage> {
        let message = self.reorder.remove(&self.expected)?;
        self.reorder_bytes -= message.payload.len();
        Some(message)
    }

    pub(crate) fn buffered_messages(&self) -> usize {
        self.reorder.len()
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.reorder_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rtt::RttEstimator;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn buffer() -> SendBuffer {
        SendBuffer::new(RttEstimator::new(ms(50), ms(5_000)))
    }

    fn frame(seq: i64) -> Bytes {
        Bytes::from(format!("frame-{seq}"))
    }

    #[test]
    fn sequence_numbers_are_contiguous_from_zero() {
        let mut b = buffer();
        assert_eq!(b.push(1, frame), 0);
        assert_eq!(b.push(1, frame), 1);
        assert_eq!(b.next_sequence(), 2);
        assert_eq!(b.len(), 2);
        assert_eq!(b.payload_bytes(), 2);
    }

    #[test]
    fn transmits_in_order_and_retransmits_identical_bytes_after_rto() {
        let t0 = crate::protocol::tests::origin();
        let mut b = buffer();
        b.push(3, frame);
        b.push(3, frame);
        assert_eq!(b.poll_transmit(t0), Some(frame(0)));
        assert_eq!(b.poll_transmit(t0), Some(frame(1)));
        assert_eq!(b.poll_transmit(t0), None);
        assert_eq!(b.poll_timeout(), Some(t0 + ms(200)));
        assert_eq!(b.handle_timeout(t0 + ms(199)), 0);
        assert_eq!(b.handle_timeout(t0 + ms(200)), 2);
        assert_eq!(b.poll_transmit(t0 + ms(200)), Some(frame(0)));
        assert_eq!(b.poll_transmit(t0 + ms(200)), Some(frame(1)));
        assert_eq!(b.retransmissions(), 2);
        // Backoff doubled the RTO.
        assert_eq!(b.poll_timeout(), Some(t0 + ms(600)));
    }

    #[test]
    fn ack_releases_and_samples_rtt_only_once_sent() {
        let t0 = crate::protocol::tests::origin();
        let mut b = buffer();
        b.push(10, frame);
        b.push(10, frame);
        b.poll_transmit(t0);
        b.poll_transmit(t0);
        assert_eq!(b.on_ack(t0 + ms(30), 1), AckOutcome::Released(Some(ms(30))));
        assert_eq!(b.on_ack(t0 + ms(30), 1), AckOutcome::Unknown);
        b.handle_timeout(t0 + ms(1_000));
        b.poll_transmit(t0 + ms(1_000));
        // Retransmitted: Karn's rule, no sample.
        assert_eq!(b.on_ack(t0 + ms(1_010), 0), AckOutcome::Released(None));
        assert_eq!(b.len(), 0);
        assert_eq!(b.payload_bytes(), 0);
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.rtt().samples(), 1);
    }

    #[test]
    fn waiting_since_tracks_ack_progress() {
        let t0 = crate::protocol::tests::origin();
        let mut b = buffer();
        assert_eq!(b.waiting_since(), None);
        b.push(1, frame);
        b.push(1, frame);
        assert_eq!(b.waiting_since(), None, "nothing sent yet");
        b.poll_transmit(t0);
        b.poll_transmit(t0 + ms(5));
        assert_eq!(b.waiting_since(), Some(t0));
        b.on_ack(t0 + ms(50), 0);
        assert_eq!(b.waiting_since(), Some(t0 + ms(50)));
        b.on_ack(t0 + ms(60), 1);
        assert_eq!(b.waiting_since(), None);
    }

    #[test]
    fn ack_for_unsent_message_is_ignored() {
        let t0 = crate::protocol::tests::origin();
        let mut b = buffer();
        b.push(1, frame);
        assert_eq!(b.on_ack(t0, 0), AckOutcome::Unknown);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn requeue_resends_in_flight_but_not_unsent() {
        let t0 = crate::protocol::tests::origin();
        let mut b = buffer();
        b.push(1, frame);
        b.push(1, frame);
        b.push(1, frame);
        b.poll_transmit(t0);
        b.poll_transmit(t0);
        b.on_ack(t0, 0);
        b.requeue_in_flight(t0);
        assert_eq!(b.poll_transmit(t0), Some(frame(1)));
        assert_eq!(b.poll_transmit(t0), Some(frame(2)));
        assert_eq!(b.poll_transmit(t0), None);
    }

    fn msg(seq: i64) -> ClientMessage {
        ClientMessage {
            message_type: crate::protocol::message::MessageType::OutputStreamData,
            schema_version: 1,
            created_date: 1,
            sequence_number: seq,
            flags: 0,
            message_id: uuid::Uuid::nil(),
            payload_type: crate::protocol::message::PayloadType::Output,
            payload: Bytes::from_static(b"xy"),
        }
    }

    #[test]
    fn reorder_buffer_classifies_and_drains() {
        let mut r = ReceiveBuffer::new(2);
        assert_eq!(r.classify(0), Arrival::InOrder);
        assert_eq!(r.classify(2), Arrival::Early);
        r.store(msg(2));
        assert_eq!(r.classify(2), Arrival::Duplicate);
        r.store(msg(1));
        assert!(!r.has_room());
        assert_eq!(r.buffered_bytes(), 4);
        assert_eq!(r.pop_ready(), None);
        r.advance();
        assert_eq!(r.pop_ready().map(|m| m.sequence_number), Some(1));
        r.advance();
        assert_eq!(r.pop_ready().map(|m| m.sequence_number), Some(2));
        r.advance();
        assert_eq!(r.classify(1), Arrival::Duplicate);
        assert_eq!(r.expected(), 3);
        assert_eq!(r.buffered_messages(), 0);
        assert_eq!(r.buffered_bytes(), 0);
    }
}
