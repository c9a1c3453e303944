//! Fuzzes `message::decode`: it must never panic, and whatever it accepts must survive an
//! encode/decode round trip unchanged (the encoder always writes HL 116 and a fresh digest).
#![no_main]

use fleet_access_agent_bridge::protocol::message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(decoded) = message::decode(frame) {
        let again = message::decode(&decoded.message.to_bytes()).map(|d| d.message);
        assert_eq!(again.as_ref(), Ok(&decoded.message));
    }
});
