//! The properties the fuzzers check on one input of untrusted bytes, shared by the cargo-fuzz
//! targets (`agent-bridge/fuzz`, libFuzzer on nightly) and the bounded randomized run on stable
//! (`agent-bridge/tests/randomized.rs`), so that the two cannot drift apart. Neither panics;
//! a broken property comes back as an error naming it.

use std::time::{Duration, Instant};

use super::{Config, Session, message};

/// `message::decode` accepts or refuses `frame` without panicking, and whatever it accepts
/// survives an encode/decode round trip unchanged (the encoder writes HL 116 and a fresh
/// digest).
pub fn decode_round_trip(frame: &[u8]) -> Result<(), String> {
    let Ok(decoded) = message::decode(frame) else {
        return Ok(());
    };
    let again = message::decode(&decoded.message.to_bytes()).map(|d| d.message);
    if again.as_ref() == Ok(&decoded.message) {
        Ok(())
    } else {
        Err(format!(
            "decoded {:?}, re-encoded and decoded {again:?}",
            decoded.message
        ))
    }
}

/// A whole client [`Session`] takes `data` as WebSocket messages (split at 0xFF bytes), each
/// also offered as local data and as a new stream, with the clock stepping from `origin`:
/// nothing may panic, and every output it queues must decode.
pub fn drive_session(data: &[u8], origin: Instant) -> Result<(), String> {
    let mut now = origin;
    let mut session = Session::new(Config::default(), now, 1_700_000_000_000, 1);
    for frame in data.split(|b| *b == 0xff) {
        let _ = session.handle_ws_message(now, frame);
        while let Some(out) = session.poll_transmit(now) {
            if let Err(error) = message::decode(&out.frame) {
                return Err(format!(
                    "the session sent a frame it cannot decode: {error}"
                ));
            }
        }
        while session.poll_event().is_some() {}
        let _ = session.handle_local_data(frame);
        if let Ok(stream) = session.open_stream() {
            let _ = session.write_stream(stream, frame);
        }
        now += Duration::from_millis(frame.len() as u64 * 10);
        session.handle_timeout(now);
    }
    Ok(())
}
