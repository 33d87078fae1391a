#!/usr/bin/env python3
"""The transformers reference for `hark bench model`, on the same card in the same run.

Builds `Gemma4UnifiedForConditionalGeneration` with random bf16 weights from a
config.json written by `hark model init --config-only` (the same architecture hark
benchmarks), and measures what hark's bench measures: prefill tok/s at each prompt
length (one forward), and greedy decode tok/s at each batch size with a static cache.
With --compare HARK_JSON it prints both side by side with hark/transformers ratios.

    python3 scripts/bench-transformers.py --config DIR --prompts 512,4096 --batches 1,4 \
        --decode 64 --json tf.json --compare hark.json

Needs torch with CUDA and transformers >= 5.17 (present on the GPU machines).
"""

import argparse
import json
import time


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def measure(args):
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    dev = torch.device("cuda")
    config = Gemma4UnifiedConfig.from_pretrained(args.config)
    torch.set_default_dtype(torch.bfloat16)
    t = time.perf_counter()
    with dev:
        model = Gemma4UnifiedForConditionalGeneration(config).eval()
    torch.cuda.synchronize()
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}; model built in {time.perf_counter() - t:.1f} s", flush=True)
    sync = torch.cuda.synchronize
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)

    def ids(batch, n):
        return torch.randint(300, 5300, (batch, n), device=dev, generator=gen)

    with torch.inference_mode():
        model(input_ids=ids(1, 64), logits_to_keep=1)  # warm-up
        for p in args.prompts:
            x = ids(1, p)
            model(input_ids=x, logits_to_keep=1)  # warm-up at this size (kernel choices, allocator)
            s, _ = timed(lambda: model(input_ids=x, logits_to_keep=1), sync)
            print(f"prefill {p}: {s * 1e3:.1f} ms, {p / s:.0f} tok/s", flush=True)
            rows.append({"what": "prefill", "tokens": p, "tok_s": p / s})
            del x
            torch.cuda.empty_cache()
        base = args.prompts[0]
        for b in args.batches:
            x = ids(b, base)
            kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0,
                      max_new_tokens=args.decode + 1, min_new_tokens=args.decode + 1)
            # With a static cache generate compiles the decode step for each shape: the
            # first call (same shape as the timed one) pays for that.
            model.generate(x, **kw)
            model(input_ids=x, logits_to_keep=1)
            s1, _ = timed(lambda: model(input_ids=x, logits_to_keep=1), sync)  # the prefill inside generate
            sn, _ = timed(lambda: model.generate(x, **kw), sync)
            step = (sn - s1) / args.decode
            print(f"decode batch {b}: {step * 1e3:.2f} ms/step, {b / step:.1f} tok/s aggregate", flush=True)
            rows.append({"what": "decode", "batch": b, "tok_s": b / step, "ms_step": step * 1e3})
            torch.cuda.empty_cache()
    return rows


def compare(tf_rows, hark_rows, preset, dtype):
    def key(r):
        return (r["what"], r.get("tokens", r.get("batch")))

    hark = {key(r): r for r in hark_rows if r.get("preset") == preset and r.get("dtype") == dtype}
    print(f"\n| {preset} {dtype} | hark tok/s | transformers tok/s | hark / transformers |")
    print("|--|--:|--:|--:|")
    for r in tf_rows:
        h = hark.get(key(r))
        what = f"prefill {r['tokens']}" if r["what"] == "prefill" else f"decode batch {r['batch']}"
        if h is None:
            print(f"| {what} | – | {r['tok_s']:.1f} | – |")
        else:
            print(f"| {what} | {h['tok_s']:.1f} | {r['tok_s']:.1f} | {h['tok_s'] / r['tok_s']:.2f}× |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="folder with config.json")
    ap.add_argument("--prompts", default="512,4096,16384")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--compare", help="hark's --json output: print both with ratios")
    ap.add_argument("--preset", default="12b")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    args.prompts = [int(x) for x in args.prompts.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",") if x]
    rows = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            compare(rows, json.load(f), args.preset, args.dtype)


if __name__ == "__main__":
    main()
