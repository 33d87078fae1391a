//! From a request to model input: the Gemma 4 template rendered and tokenized, media
//! placed at their placeholders, and a key per position for prefix matching.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::Engine;
use crate::model::gemma4::template::{self, Part, RenderOptions, ToolDecl, Turn};
use crate::model::gemma4::{audio_frames, audio_tokens, vision, ImageInput};
use crate::media::pcm;
use crate::model::{ChatMessage, GenerateRequest, UserPart};

/// Samples per audio token (40 ms at 16 kHz).
pub const AUDIO_FRAME: usize = 640;

/// Identity of one prompt position for prefix matching: the token id, or for a media
/// placeholder a hash of the frame or patch it stands for. Two clips of equal length
/// render the same placeholder ids and must never share cached keys; hashing each
/// audio frame on its own also lets a streamed turn match frame by frame.
pub type PositionKey = u64;
pub const MEDIA_KEY: u64 = 1 << 63;

pub fn frame_key(frame: &[f32]) -> PositionKey {
    let mut h = DefaultHasher::new();
    for i in 0..AUDIO_FRAME {
        frame.get(i).copied().unwrap_or(0.0).to_bits().hash(&mut h);
    }
    (h.finish() & !(1 << 62)) | MEDIA_KEY
}

/// A prompt ready for the model: ids, their keys, and the media at their placeholders.
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub keys: Vec<PositionKey>,
    pub media: Media,
}

/// Whether a key stands for an image patch (bit 62 of a media key): images are
/// prefilled whole, so a cached prefix never ends inside one.
pub fn is_image_key(k: PositionKey) -> bool {
    k & MEDIA_KEY != 0 && (k >> 62) & 1 == 1
}

impl Engine {
    /// Renders, tokenizes and places the media of a request.
    pub fn prompt(&self, request: &GenerateRequest, add_generation_prompt: bool) -> Result<Prompt, String> {
        self.image_cache.borrow_mut().retain(|_, (url, _, _)| url.strong_count() > 0);
        let patches_for = |url: &Arc<String>| self.patches_for(url);
        let rendered = render_with(request, self.settings.image_tokens, add_generation_prompt, ImageMode::Patches(&patches_for))?;
        let tokens = self.encode_prompt(&rendered.text)?;
        let vocab = self.model.config.text.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the model's vocabulary of {vocab}; tokenizer and checkpoint do not match"));
        }
        let max_ctx = self.model.config.text.max_position_embeddings;
        if tokens.len() + 1 >= max_ctx {
            return Err(format!("the prompt has {} tokens; the model holds {max_ctx}", tokens.len()));
        }
        let (media, keys) = self.media_inputs(&tokens, &rendered)?;
        Ok(Prompt { tokens, keys, media })
    }

    /// Tokenizes a rendered prompt, splicing in the original ids of remembered replies
    /// (found right after the empty thought channel that opens each model turn).
    pub(super) fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            let hit = self
                .replies
                .iter()
                .filter(|(t, _)| !t.is_empty())
                .filter_map(|(t, ids)| {
                    let marker = format!("{}{t}", template::EMPTY_THOUGHT);
                    rest.find(&marker).map(|pos| (pos, marker.len(), ids))
                })
                .min_by_key(|(pos, len, _)| (*pos, usize::MAX - len));
            match hit {
                None => {
                    out.extend(self.tokenizer.encode(rest).map_err(|e| e.to_string())?);
                    return Ok(out);
                }
                Some((pos, len, ids)) => {
                    let head = pos + template::EMPTY_THOUGHT.len();
                    out.extend(self.tokenizer.encode(&rest[..head]).map_err(|e| e.to_string())?);
                    out.extend_from_slice(ids);
                    rest = &rest[pos + len..];
                }
            }
        }
    }

    /// An image's patches and their hash, from the cache or decoded now.
    fn patches_for(&self, url: &Arc<String>) -> Result<(Arc<vision::Patches>, u64), String> {
        let id = Arc::as_ptr(url) as usize;
        if let Some((weak, patches, hash)) = self.image_cache.borrow().get(&id) {
            if weak.upgrade().is_some_and(|u| Arc::ptr_eq(&u, url)) {
                return Ok((patches.clone(), *hash));
            }
        }
        let bytes = vision::decode_data_url(url).map_err(|e| format!("image: {e}"))?;
        let patches = Arc::new(vision::decode_and_patch(&bytes, self.settings.image_tokens).map_err(|e| format!("image: {e}"))?);
        let mut h = DefaultHasher::new();
        patches.data.iter().for_each(|v| v.to_bits().hash(&mut h));
        let hash = h.finish();
        self.image_cache.borrow_mut().insert(id, (Arc::downgrade(url), patches.clone(), hash));
        Ok((patches, hash))
    }

    /// Pairs each run of audio / image placeholders (in token order) with the
    /// prompt's clips and images (in message order), checking their sizes agree, and
    /// computes every position's key.
    fn media_inputs(&self, tokens: &[u32], prompt: &Rendered) -> Result<(Media, Vec<PositionKey>), String> {
        let c = &self.model.config;
        let device = self.model.device();
        let mut keys: Vec<PositionKey> = tokens.iter().map(|&t| t as PositionKey).collect();
        let audio_runs = placeholder_runs(tokens, c.audio_token_id);
        if audio_runs.len() != prompt.audio.len() {
            return Err("audio placeholders do not match the audio clips".into());
        }
        let mut audio = Vec::with_capacity(audio_runs.len());
        let mut known = self.clip_keys.borrow_mut();
        known.retain(|_, (clip, _)| clip.strong_count() > 0);
        for (&(start, len), samples) in audio_runs.iter().zip(&prompt.audio) {
            if audio_tokens(samples.len()) != len {
                return Err("audio placeholder count does not match the clip length".into());
            }
            // A clip keeps its `Arc` from turn to turn: hash its frames once.
            let id = Arc::as_ptr(samples) as usize;
            let fresh = !matches!(known.get(&id), Some((clip, _)) if clip.upgrade().is_some_and(|c| Arc::ptr_eq(&c, samples)));
            if fresh {
                known.insert(id, (Arc::downgrade(samples), samples.chunks(AUDIO_FRAME).map(|f| frame_key(&pcm::to_f32(f))).collect()));
            }
            keys[start..start + len].copy_from_slice(&known[&id].1);
            audio.push((start, samples.clone()));
        }
        drop(known);
        let image_runs = placeholder_runs(tokens, c.image_token_id);
        if image_runs.len() != prompt.images.len() {
            return Err("image placeholders do not match the images".into());
        }
        if !image_runs.is_empty() && !self.model.has_vision() {
            return Err("this checkpoint has no vision embedder; it cannot take images".into());
        }
        let mut images = Vec::with_capacity(image_runs.len());
        for (&(start, len), (p, image_hash)) in image_runs.iter().zip(&prompt.images) {
            if p.positions.len() != len {
                return Err("image placeholder count does not match the image's patches".into());
            }
            for i in 0..len {
                // Bit 62 marks image keys, so a cached prefix never ends inside an image.
                keys[start + i] = ((image_hash ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) & !(3 << 62)) | MEDIA_KEY | (1 << 62);
            }
            images.push((start, p.clone()));
        }
        Ok((Media { audio, images, device: device.clone() }, keys))
    }
}

/// `(start, length)` of each run of `id` in `tokens`.
pub fn placeholder_runs(tokens: &[u32], id: u32) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == id {
            let start = i;
            while i < tokens.len() && tokens[i] == id {
                i += 1;
            }
            runs.push((start, i - start));
        } else {
            i += 1;
        }
    }
    runs
}

/// The request's media, placed: first placeholder position and model-ready tensors.
///
/// Tensors are made only for the span being prefilled: in a long session almost every
/// clip and image is already in the cache, and copying them all per request would cost
/// the model thread more than the new turn.
pub struct Media {
    /// Samples per clip.
    audio: Vec<(usize, Arc<Vec<i16>>)>,
    images: Vec<(usize, Arc<vision::Patches>)>,
    device: Device,
}

impl Media {
    /// Audio frames and images for the placeholders inside `[start, end)`.
    pub fn slice(&self, start: usize, end: usize) -> candle_core::Result<(Option<Tensor>, Vec<ImageInput>)> {
        let mut samples = Vec::new();
        for (pos, clip) in &self.audio {
            let (a, b) = (*pos, pos + audio_tokens(clip.len()));
            let (lo, hi) = (a.max(start), b.min(end));
            if lo < hi {
                let from = (lo - a) * AUDIO_FRAME;
                let to = ((hi - a) * AUDIO_FRAME).min(clip.len());
                samples.extend(clip[from..to].iter().map(|&s| pcm::sample_to_f32(s)));
                // The clip's last frame is zero-padded, as `audio_frames` does.
                samples.resize(samples.len().div_ceil(AUDIO_FRAME) * AUDIO_FRAME, 0.0);
            }
        }
        let audio = if samples.is_empty() { None } else { Some(audio_frames(&samples, &self.device)?) };
        // Prefill chunks never split an image (see `chunk_end` and `take_context`).
        let mut images = Vec::new();
        for (pos, p) in &self.images {
            if *pos >= start && pos + p.positions.len() <= end {
                let patches = Tensor::from_slice(&p.data, (p.positions.len(), vision::PATCH_DIM), &self.device)?;
                images.push(ImageInput { patches, positions: p.positions.clone() });
            }
        }
        Ok((audio, images))
    }
}

/// A request rendered as Gemma 4 prompt text, with the media its placeholders stand for.
pub struct Rendered {
    pub text: String,
    pub audio: Vec<Arc<Vec<i16>>>,
    /// Each image's patches and a hash of them (the image's cache key).
    pub images: Vec<(Arc<vision::Patches>, u64)>,
}

/// How images are rendered: cut into patches for the model (through the engine's
/// cache), or only sized from their header for counting tokens — which runs on a
/// session's async task and must not decode pixels.
pub enum ImageMode<'a> {
    Patches(&'a dyn Fn(&Arc<String>) -> Result<(Arc<vision::Patches>, u64), String>),
    CountOnly,
}

pub fn render_with(req: &GenerateRequest, image_tokens: usize, add_generation_prompt: bool, mode: ImageMode) -> Result<Rendered, String> {
    let mut audio = Vec::new();
    let mut images = Vec::new();
    let mut turns = Vec::new();
    let mut names: Vec<(String, String)> = Vec::new();
    for m in &req.messages {
        match m {
            ChatMessage::System(t) => turns.push(Turn::System(t.clone())),
            ChatMessage::User(parts) => {
                let mut out = Vec::new();
                for p in parts {
                    match p {
                        UserPart::Text(t) => out.push(Part::Text(t.clone())),
                        UserPart::Audio(samples) => {
                            out.push(Part::Audio { tokens: audio_tokens(samples.len()) });
                            // An empty clip renders no placeholders (a turn being opened).
                            if !samples.is_empty() {
                                audio.push(samples.clone());
                            }
                        }
                        UserPart::Image(url) => match &mode {
                            ImageMode::CountOnly => {
                                let bytes = vision::decode_data_url(url).map_err(|e| format!("image: {e}"))?;
                                let tokens = vision::token_count(&bytes, image_tokens).map_err(|e| format!("image: {e}"))?;
                                out.push(Part::Image { tokens });
                            }
                            ImageMode::Patches(patches_for) => {
                                let (patches, hash) = patches_for(url)?;
                                out.push(Part::Image { tokens: patches.positions.len() });
                                images.push((patches, hash));
                            }
                        },
                    }
                }
                turns.push(Turn::User(out));
            }
            ChatMessage::Assistant { text, tool_calls } => {
                let calls = tool_calls
                    .iter()
                    .map(|c| {
                        names.push((c.call_id.clone(), c.name.clone()));
                        (c.name.clone(), serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone())))
                    })
                    .collect();
                turns.push(Turn::Model { text: text.clone(), tool_calls: calls });
            }
            ChatMessage::Tool { call_id, output } => {
                let name = names.iter().find(|(id, _)| id == call_id).map(|(_, n)| n.clone()).unwrap_or_else(|| "tool".into());
                let output = serde_json::from_str(output).unwrap_or(Value::String(output.clone()));
                turns.push(Turn::ToolResult { name, output });
            }
        }
    }
    let tools: Vec<ToolDecl> =
        req.tools.iter().map(|t| ToolDecl { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone() }).collect();
    let system = (!req.instructions.is_empty()).then_some(req.instructions.as_str());
    let options = RenderOptions { enable_thinking: false, keep_empty_thought_in_history: true };
    Ok(Rendered { text: template::render_with_options(system, &tools, &turns, add_generation_prompt, options), audio, images })
}
