//! Text ↔ token ids through the `tokenizers` crate, from a checkpoint's
//! `tokenizer.json`, plus the synthetic tokenizer `hark model init` writes.
//!
//! The synthetic tokenizer is a byte-fallback BPE without merges (one token per
//! character) that carries Gemma 4's real special-token strings at their real ids,
//! so prompts, templates and the tool-call grammar behave exactly as with the real
//! vocabulary; only ordinary text is tokenized differently.

use std::path::Path;

use serde_json::{json, Map, Value};

/// Gemma 4's special tokens and their ids in the released vocabulary.
pub const SPECIAL_TOKENS: &[(&str, u32)] = &[
    ("<pad>", 0),
    ("<eos>", 1),
    ("<bos>", 2),
    ("<unk>", 3),
    ("<mask>", 4),
    ("<|tool>", 46),
    ("<tool|>", 47),
    ("<|tool_call>", 48),
    ("<tool_call|>", 49),
    ("<|tool_response>", 50),
    ("<tool_response|>", 51),
    ("<|\"|>", 52),
    ("<|think|>", 98),
    ("<|channel>", 100),
    ("<channel|>", 101),
    ("<|turn>", 105),
    ("<turn|>", 106),
    ("<|image>", 255_999),
    ("<|audio>", 256_000),
    ("<|image|>", 258_880),
    ("<|audio|>", 258_881),
    ("<image|>", 258_882),
    ("<audio|>", 258_883),
    ("<|video|>", 258_884),
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

pub struct Gemma4Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Gemma4Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(Self { inner })
    }

    /// Encodes text; special-token strings inside it become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Decodes ids, keeping special tokens as text (the tool-call parser needs them).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into text deltas without splitting UTF-8 sequences
/// that byte-fallback tokens spread over several ids.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly complete text, if any.
    pub fn push(&mut self, tok: &Gemma4Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        // A trailing replacement character means an incomplete byte sequence: wait.
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }
}

/// A `tokenizer.json` with `vocab_size` entries carrying the real special tokens.
pub fn synthetic_tokenizer_json(vocab_size: usize) -> Value {
    let mut vocab: Vec<Option<String>> = vec![None; vocab_size];
    for &(tok, id) in SPECIAL_TOKENS {
        if (id as usize) < vocab_size {
            vocab[id as usize] = Some(tok.to_string());
        }
    }
    if vocab_size > 107 {
        vocab[107] = Some("\n".into());
    }
    // Byte fallback tokens, then printable ASCII (space is "▁" after normalisation).
    let mut next = 256usize;
    let mut place = |s: String, vocab: &mut Vec<Option<String>>| {
        while next < vocab_size && vocab[next].is_some() {
            next += 1;
        }
        if next < vocab_size {
            vocab[next] = Some(s);
            next += 1;
        }
    };
    for b in 0..=255u8 {
        place(format!("<0x{b:02X}>"), &mut vocab);
    }
    place("▁".into(), &mut vocab);
    for c in 33u8..127 {
        place((c as char).to_string(), &mut vocab);
    }
    let mut map = Map::with_capacity(vocab_size);
    for (id, tok) in vocab.into_iter().enumerate() {
        map.insert(tok.unwrap_or_else(|| format!("<unused{id}>")), json!(id));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .filter(|(_, id)| (*id as usize) < vocab_size)
        .map(|(tok, id)| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
            "vocab": Value::Object(map), "merges": []
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokenizer_round_trips_and_keeps_special_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, synthetic_tokenizer_json(262_144).to_string()).unwrap();
        let tok = Gemma4Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.vocab_size(), 262_144);
        let text = "<|turn>user\nHi, ünïcode ✓ {x:<|\"|>y<|\"|>}<turn|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], 105);
        assert_eq!(*ids.last().unwrap(), 106);
        assert!(ids.contains(&52));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.token_id("<|audio|>"), Some(258_881));

        // Streaming decode never splits a multi-byte character.
        let mut sd = StreamDecoder::new();
        let mut out = String::new();
        for id in tok.encode("a✓b").unwrap() {
            let d = sd.push(&tok, id).unwrap();
            assert!(!d.contains('\u{FFFD}'));
            out.push_str(&d);
        }
        assert_eq!(out, "a✓b");
    }
}
