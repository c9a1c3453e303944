//! Fuzzes a whole client `Session` (see `protocol::fuzzing::drive_session`).
#![no_main]

use fleet_access_agent_bridge::protocol::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = fuzzing::drive_session(data, std::time::Instant::now()) {
        panic!("{broken}");
    }
});
