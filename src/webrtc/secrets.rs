//! Ephemeral client keys (`ek_…`) from `POST /v1/realtime/client_secrets`.
//!
//! A page must not carry hark's real API key, so a trusted backend mints a short-lived
//! key and hands it to the page, which spends it once on `POST /v1/realtime/calls`.
//! Each key remembers the session configuration it was minted with; that
//! configuration becomes the call's first `session.update`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most keys held at once: a client minting keys in a loop cannot grow memory
/// without bound (expired ones are swept first).
const MAX_SECRETS: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("This ephemeral key is not known to hark (never issued, or hark restarted). Get a new one from POST /v1/realtime/client_secrets.")]
    Unknown,
    #[error("This ephemeral key has expired. Get a new one from POST /v1/realtime/client_secrets.")]
    Expired,
    #[error("This ephemeral key has already been used; each key opens one call. Get a new one from POST /v1/realtime/client_secrets.")]
    Used,
    #[error("Too many ephemeral keys are outstanding; try again later.")]
    Full,
}

/// What a key was minted with.
#[derive(Debug, Clone)]
pub struct Minted {
    pub value: String,
    /// Unix seconds.
    pub expires_at: u64,
}

struct Entry {
    expires: Instant,
    used: bool,
    /// The session configuration (`session` of the request), applied when the call opens.
    session: Option<serde_json::Value>,
}

#[derive(Default)]
pub struct ClientSecrets {
    entries: Mutex<HashMap<String, Entry>>,
}

impl ClientSecrets {
    pub fn mint(&self, ttl: Duration, session: Option<serde_json::Value>) -> Result<Minted, SecretError> {
        let value = format!("ek_{}", random_token());
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Used keys are kept until they expire, so a replay is told "already used"
        // rather than "unknown".
        entries.retain(|_, e| e.expires > now);
        if entries.len() >= MAX_SECRETS {
            return Err(SecretError::Full);
        }
        entries.insert(value.clone(), Entry { expires: now + ttl, used: false, session });
        let expires_at = SystemTime::now().checked_add(ttl).unwrap_or(SystemTime::now()).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Minted { value, expires_at })
    }

    /// Whether a key could be spent now, without spending it.
    pub fn check(&self, value: &str) -> Result<(), SecretError> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(value).ok_or(SecretError::Unknown)?;
        if entry.expires <= Instant::now() {
            return Err(SecretError::Expired);
        }
        if entry.used {
            return Err(SecretError::Used);
        }
        Ok(())
    }

    /// Spends a key: on success it returns the session configuration it was minted with.
    pub fn redeem(&self, value: &str) -> Result<Option<serde_json::Value>, SecretError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get_mut(value).ok_or(SecretError::Unknown)?;
        if entry.expires <= Instant::now() {
            entries.remove(value);
            return Err(SecretError::Expired);
        }
        if entry.used {
            return Err(SecretError::Used);
        }
        entry.used = true;
        Ok(entry.session.take())
    }
}

/// 32 random alphanumerics (≈190 bits): unguessable for a key that lives minutes.
/// `fastrand` seeds per thread from the OS; it is not a CSPRNG, so the OS's own
/// random bytes are mixed in where available.
fn random_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut os = [0u8; 32];
    let have_os = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut os)).is_ok();
    (0..32)
        .map(|i| {
            let r = if have_os { os[i] as usize ^ fastrand::usize(..256) } else { fastrand::usize(..256) };
            ALPHABET[r % ALPHABET.len()] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_expiry() {
        let s = ClientSecrets::default();
        let k = s.mint(Duration::from_secs(60), Some(serde_json::json!({"instructions": "x"}))).unwrap();
        assert!(k.value.starts_with("ek_") && k.value.len() == 35);
        assert_eq!(s.redeem(&k.value).unwrap(), Some(serde_json::json!({"instructions": "x"})));
        assert_eq!(s.redeem(&k.value), Err(SecretError::Used));
        assert_eq!(s.redeem("ek_nope"), Err(SecretError::Unknown));
        let short = s.mint(Duration::from_millis(0), None).unwrap();
        assert_eq!(s.redeem(&short.value), Err(SecretError::Expired));
    }
}
