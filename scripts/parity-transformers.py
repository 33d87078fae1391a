#!/usr/bin/env python3
"""The baseline for `hark model parity --dtype bf16`: transformers itself, run in a
given dtype on the GPU over the same committed fixtures, against its own f32 logits.
Whatever error transformers shows in bf16 is what bf16 weights and activations cost;
hark's bf16 error is judged next to it.

    python3 scripts/parity-transformers.py [--fixtures tests/fixtures/gemma4] [--dtype bf16]
"""

import argparse
import os

import numpy as np
import torch


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures/gemma4")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    from transformers import Gemma4UnifiedForConditionalGeneration

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    print(f"| transformers {args.dtype} on {torch.cuda.get_device_name()} vs its f32 CPU fixtures | relative error |")
    print("|--|--:|")
    for name in ["tiny_mm", "tiny_text"]:
        d = os.path.join(args.fixtures, name)
        model = Gemma4UnifiedForConditionalGeneration.from_pretrained(d, dtype=dtype).to(dev).eval()

        def load(n):
            return torch.from_numpy(np.load(os.path.join(d, n))).to(dev)

        def run(**kw):
            with torch.inference_mode():
                return model(**kw, use_cache=False).logits.float().cpu().numpy()

        ids = load("text_input_ids.npy")
        print(f"| {name}: text | {rel(run(input_ids=ids), np.load(os.path.join(d, 'text_logits.npy'))):.2e} |")
        if os.path.exists(os.path.join(d, "audio_logits.npy")):
            ids = load("audio_input_ids.npy")
            got = run(input_ids=ids, input_features=load("audio_input_features.npy").to(dtype),
                      input_features_mask=load("audio_input_features_mask.npy"),
                      mm_token_type_ids=load("audio_mm_token_type_ids.npy"))
            print(f"| {name}: audio | {rel(got, np.load(os.path.join(d, 'audio_logits.npy'))):.2e} |")
        if os.path.exists(os.path.join(d, "image_logits.npy")):
            ids = load("image_input_ids.npy")
            got = run(input_ids=ids, pixel_values=load("image_pixel_values.npy").to(dtype),
                      image_position_ids=load("image_position_ids.npy"),
                      mm_token_type_ids=load("image_mm_token_type_ids.npy"))
            print(f"| {name}: image | {rel(got, np.load(os.path.join(d, 'image_logits.npy'))):.2e} |")


if __name__ == "__main__":
    main()
