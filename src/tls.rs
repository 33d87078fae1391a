//! One process-wide TLS setup: rustls with the ring crypto provider, installed once
//! before any HTTPS client is built (reqwest is built without a default provider).

use std::sync::Once;

static INIT: Once = Once::new();

pub fn init() {
    INIT.call_once(|| {
        // Fails only if another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
