//! `POST /v1/chat/completions` bodies as axum's JSON extractor reads them: any bytes
//! deserialize into a `ChatRequest` or are refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<hark::server::chat::ChatRequest>(data);
});
