//! `POST /v1/realtime/calls` bodies: any SDP text must parse or be refused with an
//! `OfferError`, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hark::webrtc::signaling::parse_offer(text);
    }
});
