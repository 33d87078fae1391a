//! `input_image` parts: the `data:image/…;base64,…` URL, then the PNG/JPEG inside it
//! decoded and cut into the model's patches.
#![no_main]

use hark::model::gemma4::vision::{decode_and_patch, decode_data_url};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = decode_data_url(text) {
            let _ = decode_and_patch(&bytes, 70);
        }
    }
    // The image bytes themselves, as a client's data URL would carry them.
    let _ = decode_and_patch(data, 70);
});
