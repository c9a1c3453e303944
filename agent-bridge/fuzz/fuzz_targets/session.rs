//! Fuzzes a whole client `Session`: the input is split into WebSocket messages at 0xFF bytes
//! and fed in with a stepping clock; no input may panic it.
#![no_main]

use std::time::{Duration, Instant};

use fleet_access_agent_bridge::protocol::{Config, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut session = Session::new(Config::default(), now, 1_700_000_000_000, 1);
    for frame in data.split(|b| *b == 0xff) {
        let _ = session.handle_ws_message(now, frame);
        while session.poll_transmit(now).is_some() {}
        while session.poll_event().is_some() {}
        let _ = session.handle_local_data(now, frame);
        let _ = session.open_stream(now);
        now += Duration::from_millis(frame.len() as u64 * 10);
        session.handle_timeout(now);
    }
});
