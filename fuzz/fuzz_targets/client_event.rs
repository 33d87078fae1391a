//! Realtime client events as they arrive on the WebSocket: any text must parse or be
//! refused with a protocol error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is UTF-8 by the time hark sees it.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hark::protocol::parse_client_event(text);
    }
});
