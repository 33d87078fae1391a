#!/usr/bin/env python3
"""Generate tiny random-weight `gemma4_unified` checkpoints + reference logits.

Reference: Hugging Face transformers 5.24.0 (`transformers/models/gemma4_unified/`).
Everything is deterministic (fixed seeds, CPU, f32, eager attention).  No hub access.

Usage (see docs/gemma4_unified.md, "Fixtures"):
    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install torch torchvision transformers==5.24.0 safetensors numpy pillow
    /tmp/tfenv/bin/python scripts/make_gemma4_fixtures.py [--out tests/fixtures/gemma4]

Output layout (one folder per tiny config):
    <out>/tiny_mm/     config.json, model.safetensors, manifest.json, *.npy, audio.wav, image.png,
                       processor_image_in.png, processor_image_resized.png
    <out>/tiny_text/   text-only variant (no k_eq_v, no softcap, first layer global, per_layer_config form)
All .npy arrays: logits f32 [1, L, vocab]; input_ids int64 [1, L]; input_features f32 [n_audio, frames, 640];
input_features_mask bool; pixel_values f32 [n_img, patches, 6912]; image_position_ids int64 [n_img, patches, 2];
mm_token_type_ids int64 [1, L].
"""

import argparse
import json
import math
import os
import shutil
import wave

import numpy as np
import torch

import transformers
from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
from transformers.cache_utils import DynamicCache

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# Token ids (vocab 512).  Real ids in the 262144 vocab are given in the comments.
PAD, EOS, BOS = 0, 1, 2
TURN_OPEN, TURN_CLOSE = 105, 106  # <|turn>, <turn|> (same ids as the real vocab)
NEWLINE = 107  # stand-in for "\n"
BOI, BOA = 400, 401  # <|image> 255999, <|audio> 256000
IMAGE, AUDIO, EOI, EOA, VIDEO = 480, 481, 482, 483, 484  # <|image|> 258880 <|audio|> 258881 <image|> 258882 <audio|> 258883 <|video|> 258884
SPECIAL = {
    "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
    "turn_open": TURN_OPEN, "turn_close": TURN_CLOSE, "newline_standin": NEWLINE,
    "boi_token_id": BOI, "eoi_token_id": EOI, "image_token_id": IMAGE, "video_token_id": VIDEO,
    "boa_token_id": BOA, "eoa_token_index": EOA, "audio_token_id": AUDIO,
}


def mm_config():
    text = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    # mm_embed_dim (48) deliberately != text hidden (64) so a transposed projection can't go unnoticed.
    vision = dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=16, rms_norm_eps=1e-6)
    audio = dict(audio_embed_dim=640, rms_norm_eps=1e-6)
    return Gemma4UnifiedConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, video_token_id=VIDEO,
        boa_token_id=BOA, eoa_token_index=EOA, audio_token_id=AUDIO,
    )


def text_config_variant():
    text = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attention_k_eq_v=False, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        # explicit per-layer form (what older checkpoints carry): global layers head_dim 32, 2 KV heads (= default)
        per_layer_config={"0": {"head_dim": 32}, "3": {"head_dim": 32}},
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1000000.0},
        },
        final_logit_softcapping=None, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    return Gemma4UnifiedConfig(
        text_config=text, vision_config=None, audio_config=None,
        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, video_token_id=VIDEO,
        boa_token_id=BOA, eoa_token_index=EOA, audio_token_id=AUDIO,
    )


def randomize(model, seed):
    """Give EVERY saved tensor (incl. norm weights, layer_scalar, LayerNorm biases) a random value."""
    g = torch.Generator().manual_seed(seed)
    sd_keys = set(model.state_dict().keys())
    seen = set()
    with torch.no_grad():
        named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in sd_keys]
        for name, t in named:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if name.endswith("layer_scalar"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.0 + 0.5)           # U(0.5, 1.5)
            elif "norm" in name or "_ln" in name:
                if name.endswith("bias"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
                else:
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.25)     # U(0.25, 1.75)
            elif "pos_embedding" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif "embed_tokens" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dim() == 2:  # Linear weight [out, in]
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1]))
            else:  # Linear bias
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            assert name in sd_keys or name == "lm_head.weight", name


def rand_text(rng, n):
    # ordinary text ids: avoid 0..2 and the specials >= 400
    return rng.integers(3, 400, size=n).tolist()


def user_turn(rng, body):
    return [TURN_OPEN] + rand_text(rng, 1) + [NEWLINE] + body + [TURN_CLOSE, NEWLINE]


def model_prompt(rng):
    return [TURN_OPEN] + rand_text(rng, 1) + [NEWLINE]


def save_npy(d, name, arr, files):
    np.save(os.path.join(d, name + ".npy"), arr)
    files[name] = {"file": name + ".npy", "dtype": str(arr.dtype), "shape": list(arr.shape)}


def hidden_state_hooks(model):
    lm = model.model.language_model
    store = {}
    hs = []

    def pre0(mod, args, kwargs):
        store["embeds"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(mod, args, kwargs, out):
        hs.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    def normpost(mod, args, out):
        store["final_norm"] = out.detach().clone()

    handles = [lm.layers[0].register_forward_pre_hook(pre0, with_kwargs=True)]
    handles += [l.register_forward_hook(post, with_kwargs=True) for l in lm.layers]
    handles.append(lm.norm.register_forward_hook(normpost))
    return store, hs, handles


def forward(model, **kw):
    with torch.no_grad():
        return model(**kw, use_cache=False).logits.float().numpy()


def write_wav(path, samples_i16, sr=16000):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(samples_i16.astype("<i2").tobytes())


def make_image(h, w, seed):
    """Smooth deterministic RGB uint8 image (gradients + a few discs), HWC."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    img[..., 0] = 255 * xx / max(w - 1, 1)
    img[..., 1] = 255 * yy / max(h - 1, 1)
    img[..., 2] = 128 + 100 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def case_mm(out_root):
    d = os.path.join(out_root, "tiny_mm")
    os.makedirs(d, exist_ok=True)
    cfg = mm_config()
    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize(model, seed=1234)
    model.save_pretrained(d, safe_serialization=True)
    # reload through the real loader (f32, eager) so fixtures come from exactly the saved file
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()

    manifest = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "config_dir": ".", "special_tokens": SPECIAL, "cases": {}}
    rng = np.random.default_rng(42)

    # ---------------- text ----------------
    ids = [BOS] + user_turn(rng, rand_text(rng, 40)) + model_prompt(rng) + rand_text(rng, 8)
    input_ids = torch.tensor([ids])
    store, hs, handles = hidden_state_hooks(model)
    logits = forward(model, input_ids=input_ids)
    for h in handles:
        h.remove()
    # cross-check sdpa vs eager
    model_sdpa = Gemma4UnifiedForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    sdpa_diff = float(np.abs(forward(model_sdpa, input_ids=input_ids) - logits).max())
    del model_sdpa
    files = {}
    save_npy(d, "text_input_ids", input_ids.numpy(), files)
    save_npy(d, "text_logits", logits, files)
    save_npy(d, "text_embeds", store["embeds"].numpy(), files)
    save_npy(d, "text_layer_outputs", torch.stack(hs, 0).numpy(), files)  # [n_layers, 1, L, hidden]
    save_npy(d, "text_final_norm", store["final_norm"].numpy(), files)
    manifest["cases"]["text"] = {
        "description": "text only; L crosses the sliding window several times",
        "files": files, "seq_len": len(ids), "eager_vs_sdpa_max_abs_diff": sdpa_diff,
        "notes": "text_embeds = scaled token embeddings (input of layer 0); text_layer_outputs[i] = output of decoder "
                 "layer i (after *layer_scalar); text_final_norm = after model.language_model.norm (pre lm_head).",
    }

    # ---------------- incremental (cache) ----------------
    split = 29
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        a = model(input_ids=input_ids[:, :split], cache=cache, use_cache=True).logits
        b = model(input_ids=input_ids[:, split:], cache=cache, use_cache=True).logits
        inc = torch.cat([a, b], 1).numpy()
        # also token by token after the prefix
        cache2 = DynamicCache(config=model.config.get_text_config())
        parts = [model(input_ids=input_ids[:, :split], cache=cache2, use_cache=True).logits]
        for t in range(split, len(ids)):
            parts.append(model(input_ids=input_ids[:, t:t + 1], cache=cache2, use_cache=True).logits)
        inc1 = torch.cat(parts, 1).numpy()
    manifest["cases"]["incremental"] = {
        "description": "same ids/logits as the text case; transformers checked that prefix[:split] + continuation "
                       "(one chunk, and token-by-token) with DynamicCache reproduces the full-forward logits",
        "input_ids": "text_input_ids.npy", "logits": "text_logits.npy", "split": split,
        "max_abs_diff_chunk": float(np.abs(inc - logits).max()),
        "max_abs_diff_token_by_token": float(np.abs(inc1 - logits).max()),
    }

    # ---------------- audio ----------------
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor
    sr = 16000
    n = 9760  # 0.61 s -> 15.25 frames -> 16 frames, last one zero-padded
    t = np.arange(n) / sr
    sig = 0.45 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 1234.5 * t + 0.3) + 0.1 * np.sin(2 * np.pi * 97 * t)
    sig *= np.minimum(1.0, np.minimum(t / 0.05, (t[-1] - t) / 0.05 + 0.2))
    pcm = np.clip(np.rint(sig * 32767), -32768, 32767).astype(np.int16)
    write_wav(os.path.join(d, "audio.wav"), pcm)
    wav_f32 = pcm.astype(np.float32) / 32768.0  # what a WAV reader yields
    fe = Gemma4UnifiedAudioFeatureExtractor()
    feats = fe(wav_f32, return_tensors="pt")
    input_features, input_features_mask = feats["input_features"], feats["input_features_mask"]
    n_frames = int(input_features_mask.sum())
    assert n_frames == math.ceil(n / 640) == 16
    body = rand_text(rng, 4) + [BOA] + [AUDIO] * n_frames + [EOA] + rand_text(rng, 3)
    ids_a = [BOS] + user_turn(rng, body) + model_prompt(rng) + rand_text(rng, 3)
    input_ids_a = torch.tensor([ids_a])
    mm_tt_a = torch.tensor([[3 if i == AUDIO else 0 for i in ids_a]])
    store, hs, handles = hidden_state_hooks(model)
    logits_a = forward(model, input_ids=input_ids_a, input_features=input_features,
                       input_features_mask=input_features_mask, mm_token_type_ids=mm_tt_a)
    for h in handles:
        h.remove()
    # audio never changes the mask: same logits without mm_token_type_ids
    logits_a2 = forward(model, input_ids=input_ids_a, input_features=input_features, input_features_mask=input_features_mask)
    # gotcha check: without input_features_mask transformers silently ignores the audio
    logits_a_nomask = forward(model, input_ids=input_ids_a, input_features=input_features)
    # streaming prefill: split inside the audio block (audio is causal, so a chunked prefill must match)
    a_start = ids_a.index(AUDIO)
    split_a = a_start + 7
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        la = model(input_ids=input_ids_a[:, :split_a], input_features=input_features[:, :7],
                   input_features_mask=input_features_mask[:, :7], cache=cache, use_cache=True).logits
        lb = model(input_ids=input_ids_a[:, split_a:], input_features=input_features[:, 7:],
                   input_features_mask=input_features_mask[:, 7:], cache=cache, use_cache=True).logits
        inc_a = torch.cat([la, lb], 1).numpy()
    files = {}
    save_npy(d, "audio_input_ids", input_ids_a.numpy(), files)
    save_npy(d, "audio_input_features", input_features.numpy().astype(np.float32), files)
    save_npy(d, "audio_input_features_mask", input_features_mask.numpy(), files)
    save_npy(d, "audio_mm_token_type_ids", mm_tt_a.numpy(), files)
    save_npy(d, "audio_logits", logits_a, files)
    save_npy(d, "audio_embeds", store["embeds"].numpy(), files)
    manifest["cases"]["audio"] = {
        "description": "text + 0.61 s of 16 kHz audio (audio.wav, int16 PCM; model input = int16/32768) -> 16 frames of 640",
        "files": files, "wav": "audio.wav", "num_samples": n, "num_audio_tokens": n_frames,
        "audio_token_positions": [i for i, x in enumerate(ids_a) if x == AUDIO],
        "max_abs_diff_without_mm_token_type_ids": float(np.abs(logits_a2 - logits_a).max()),
        "max_abs_diff_if_input_features_mask_omitted(audio_ignored!)": float(np.abs(logits_a_nomask - logits_a).max()),
        "streaming_prefill": {"split": split_a, "audio_frames_in_first_chunk": 7,
                              "max_abs_diff": float(np.abs(inc_a - logits_a).max())},
        "notes": "audio_embeds = inputs_embeds after the audio frames were scattered in (input of layer 0).",
    }

    # ---------------- image ----------------
    from PIL import Image
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor
    img = make_image(96, 144, seed=7)  # H=96, W=144 -> 2 rows x 3 cols of 48 px patches
    img_b = make_image(48, 96, seed=8)  # H=48, W=96 -> 1 row x 2 cols
    Image.fromarray(img).save(os.path.join(d, "image.png"))
    Image.fromarray(img_b).save(os.path.join(d, "image2.png"))
    ip = Gemma4UnifiedImageProcessor()
    proc = ip([Image.open(os.path.join(d, "image.png")), Image.open(os.path.join(d, "image2.png"))],
              do_resize=False, max_soft_tokens=70, return_tensors="pt")
    pv_pad, pos_pad = proc["pixel_values"], proc["image_position_ids"]  # [2, 70, 6912], [2, 70, 2] (padded with -1)
    n_per = [int(x) for x in proc["num_soft_tokens_per_image"]]
    assert n_per == [6, 2], n_per
    # independent check of the patch layout: patch i = the 48x48 block at grid (row i // gw, col i % gw),
    # flattened HWC (row-major, channel fastest), /255
    for k, (im, gh, gw) in enumerate(((img, 2, 3), (img_b, 1, 2))):
        ref = im.astype(np.float32) / 255.0
        exp = np.stack([ref[r * 48:(r + 1) * 48, c * 48:(c + 1) * 48].reshape(-1) for r in range(gh) for c in range(gw)])
        assert np.abs(pv_pad[k, :gh * gw].numpy() - exp).max() < 1e-6, "patch layout differs from spec"
        assert pos_pad[k, :gh * gw].tolist() == [[c, r] for r in range(gh) for c in range(gw)]
        assert (pos_pad[k, gh * gw:] == -1).all() and (pv_pad[k, gh * gw:] == 0).all()
    n_img = sum(n_per)
    body = (rand_text(rng, 10) + [BOI] + [IMAGE] * n_per[0] + [EOI] + rand_text(rng, 3)
            + [BOI] + [IMAGE] * n_per[1] + [EOI] + rand_text(rng, 14))
    ids_i = [BOS] + user_turn(rng, body) + model_prompt(rng) + rand_text(rng, 6)
    input_ids_i = torch.tensor([ids_i])
    mm_tt_i = torch.tensor([[1 if i == IMAGE else 0 for i in ids_i]])
    store, hs, handles = hidden_state_hooks(model)
    logits_i = forward(model, input_ids=input_ids_i, pixel_values=pv_pad, image_position_ids=pos_pad,
                       mm_token_type_ids=mm_tt_i)
    for h in handles:
        h.remove()
    mx = max(n_per)  # keep only up to the longest image's patches; image 2 keeps 4 padding rows (zeros, pos -1)
    pv, pos = pv_pad[:, :mx].contiguous(), pos_pad[:, :mx].contiguous()
    logits_i_unpadded = forward(model, input_ids=input_ids_i, pixel_values=pv, image_position_ids=pos,
                                mm_token_type_ids=mm_tt_i)
    logits_i_causal = forward(model, input_ids=input_ids_i, pixel_values=pv, image_position_ids=pos)
    # The mask that `generate()` builds for STATIC caches (Gemma4UnifiedForConditionalGeneration.create_masks_for_generate
    # -> create_masks_for_vision_model): bidirectional block only on sliding layers, full layers purely causal.
    with torch.no_grad():
        embeds = store["embeds"]
        masks = model.create_masks_for_generate(
            config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
            position_ids=torch.arange(len(ids_i))[None], mm_token_type_ids=mm_tt_i)
        logits_i_gen = model(inputs_embeds=embeds, attention_mask=masks, use_cache=False).logits.numpy()
    files = {}
    save_npy(d, "image_input_ids", input_ids_i.numpy(), files)
    save_npy(d, "image_pixel_values", pv.numpy().astype(np.float32), files)
    save_npy(d, "image_position_ids", pos.numpy().astype(np.int64), files)
    save_npy(d, "image_mm_token_type_ids", mm_tt_i.numpy(), files)
    save_npy(d, "image_logits", logits_i, files)
    save_npy(d, "image_logits_causal_only", logits_i_causal, files)
    save_npy(d, "image_logits_static_cache_mask", logits_i_gen, files)
    save_npy(d, "image_embeds", store["embeds"].numpy(), files)
    manifest["cases"]["image"] = {
        "description": "text + two images: image.png 144x96 (WxH) -> 3x2 = 6 patches; image2.png 96x48 -> 2x1 = 2 "
                       "patches (48 px, no resize). Two separate bidirectional blocks.",
        "files": files, "png": ["image.png", "image2.png"], "num_image_tokens": n_per,
        "image_token_positions": [i for i, x in enumerate(ids_i) if x == IMAGE],
        "processor_call": "Gemma4UnifiedImageProcessor()([img, img2], do_resize=False, max_soft_tokens=70); the processor "
                          "pads pixel_values/image_position_ids to 70 rows (zeros / -1); the stored arrays are cut to 6 "
                          "rows, so image 2 still has 4 padding rows with position (-1,-1) that must be dropped "
                          "(logits identical, see max_abs_diff_padded_vs_unpadded)",
        "max_abs_diff_padded_vs_unpadded": float(np.abs(logits_i_unpadded - logits_i).max()),
        "logits_variants": {
            "image_logits": "model(input_ids, pixel_values, image_position_ids, mm_token_type_ids) -- DEFAULT forward: "
                            "image block bidirectional on ALL layers (sliding: (causal&window)|block; full: causal|block)",
            "image_logits_static_cache_mask": "masks from Gemma4UnifiedForConditionalGeneration.create_masks_for_generate "
                                              "(static-cache generate path): full layers causal only; sliding layers "
                                              "window & (causal|block)",
            "image_logits_causal_only": "no mm_token_type_ids -> plain causal/sliding masks everywhere",
        },
        "max_abs_diff_default_vs_static_cache_mask": float(np.abs(logits_i_gen - logits_i).max()),
        "max_abs_diff_default_vs_causal_only": float(np.abs(logits_i_causal - logits_i).max()),
        "notes": "image_embeds = inputs_embeds after the image soft tokens were scattered in (input of layer 0).",
    }

    # ---------------- processor: aspect-preserving resize ----------------
    img2 = make_image(130, 200, seed=11)  # H=130, W=200
    Image.fromarray(img2).save(os.path.join(d, "processor_image_in.png"))
    results = {}
    for budget in (70, 140, 280):
        p = ip(Image.open(os.path.join(d, "processor_image_in.png")), max_soft_tokens=budget, return_tensors="pt")
        nt = int(p["num_soft_tokens_per_image"][0])
        pos2 = p["image_position_ids"][0, :nt]
        gw, gh = int(pos2[:, 0].max()) + 1, int(pos2[:, 1].max()) + 1
        results[str(budget)] = {"num_soft_tokens": nt, "grid_w": gw, "grid_h": gh,
                                "resized_h": gh * 48, "resized_w": gw * 48,
                                "pixel_values_sum": float(p["pixel_values"][0, :nt].double().sum()),
                                "pixel_values_first8": p["pixel_values"][0, 0, :8].tolist()}
        if budget == 70:
            pvr = p["pixel_values"][0, :nt].numpy()
            # reassemble the resized image from its patches
            r_img = pvr.reshape(gh, gw, 48, 48, 3).transpose(0, 2, 1, 3, 4).reshape(gh * 48, gw * 48, 3)
            r_u8 = np.rint(r_img * 255).astype(np.uint8)
            results[str(budget)]["resized_is_uint8_exact"] = bool(np.abs(r_u8 / 255.0 - r_img).max() < 1e-6)
            Image.fromarray(r_u8).save(os.path.join(d, "processor_image_resized.png"))
    manifest["processor_image"] = {
        "input_png": "processor_image_in.png", "input_h": 130, "input_w": 200,
        "resized_png_for_budget_70": "processor_image_resized.png",
        "resample": "torchvision resize, BICUBIC, antialias=True, on the uint8 image; then /255 (no mean/std)",
        "by_max_soft_tokens": results,
    }

    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def case_text(out_root):
    d = os.path.join(out_root, "tiny_text")
    os.makedirs(d, exist_ok=True)
    cfg = text_config_variant()
    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize(model, seed=99)
    model.save_pretrained(d, safe_serialization=True)
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    rng = np.random.default_rng(5)
    ids = [BOS] + user_turn(rng, rand_text(rng, 25)) + model_prompt(rng) + rand_text(rng, 4)
    input_ids = torch.tensor([ids])
    store, hs, handles = hidden_state_hooks(model)
    logits = forward(model, input_ids=input_ids)
    for h in handles:
        h.remove()
    split = 17
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        a = model(input_ids=input_ids[:, :split], cache=cache, use_cache=True).logits
        b = model(input_ids=input_ids[:, split:], cache=cache, use_cache=True).logits
        inc = torch.cat([a, b], 1).numpy()
    files = {}
    save_npy(d, "text_input_ids", input_ids.numpy(), files)
    save_npy(d, "text_logits", logits, files)
    save_npy(d, "text_layer_outputs", torch.stack(hs, 0).numpy(), files)
    manifest = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "special_tokens": SPECIAL,
                "cases": {"text": {"description": "text-only variant: no vision/audio config (null), attention_k_eq_v "
                                                  "false (global layers have v_proj), 2 KV heads on global layers, "
                                                  "partial_rotary_factor 0.5, no final softcap, first layer global, "
                                                  "sliding_window 8, rms_norm_eps 1e-5",
                                   "files": files, "seq_len": len(ids),
                                   "incremental": {"split": split, "max_abs_diff": float(np.abs(inc - logits).max())}}}}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "gemma4"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    m1 = case_mm(out)
    m2 = case_text(out)
    for sub in ("tiny_mm", "tiny_text"):
        gc = os.path.join(out, sub, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)
    print(json.dumps({"tiny_mm": m1["cases"], "tiny_text": m2["cases"]}, indent=1)[:6000])
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"total bytes: {total}")


if __name__ == "__main__":
    main()
