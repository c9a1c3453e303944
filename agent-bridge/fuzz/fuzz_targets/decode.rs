//! Fuzzes `message::decode` (see `protocol::fuzzing::decode_round_trip`).
#![no_main]

use fleet_access_agent_bridge::protocol::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Err(broken) = fuzzing::decode_round_trip(frame) {
        panic!("{broken}");
    }
});
