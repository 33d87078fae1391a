#!/usr/bin/env python3
"""End to end on a GPU machine: `hark serve` with the embedded model on CUDA, driven by
a Realtime client over WebSocket (aiohttp, present on the GPU image; the openai SDK is
not). Asserts a text turn gets a completed response with streamed text, and prints the
time to the first text delta.

    python3 scripts/gpu-realtime-smoke.py --bin dist/hark-cuda --checkpoint DIR [--dtype bf16]
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def session(port):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        deadline = time.time() + 120
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        print("readyz:", await r.text())
                        break
            except aiohttp.ClientError:
                pass
            if time.time() > deadline:
                raise SystemExit("hark did not become ready in 120 s")
            await asyncio.sleep(0.5)
        async with http.ws_connect(f"ws://127.0.0.1:{port}/v1/realtime?model=hark") as ws:
            first = json.loads((await ws.receive()).data)
            assert first["type"] == "session.created", first
            await ws.send_json({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
            await ws.send_json({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": "Say something about the sea."}]}})
            sent = time.perf_counter()
            await ws.send_json({"type": "response.create", "response": {"max_output_tokens": 24}})
            deltas, first_delta, done = [], None, None
            while done is None:
                msg = await asyncio.wait_for(ws.receive(), 60)
                ev = json.loads(msg.data)
                if ev["type"] == "error":
                    raise SystemExit(f"error event: {ev}")
                if ev["type"] == "response.output_text.delta":
                    first_delta = first_delta or time.perf_counter()
                    deltas.append(ev["delta"])
                if ev["type"] == "response.done":
                    done = ev
            status = done["response"]["status"]
            print(f"response.done: status {status}, {len(deltas)} text deltas, "
                  f"first delta {1e3 * (first_delta - sent):.1f} ms after response.create, usage {done['response'].get('usage')}")
            assert status in ("completed", "incomplete"), status
            assert deltas, "no text streamed"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="dist/hark-cuda")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    port = free_port()
    env = dict(os.environ, HARK_SERVER__PORT=str(port), HARK_BACKEND__KIND="embedded",
               HARK_BACKEND__EMBEDDED__CHECKPOINT=os.path.abspath(args.checkpoint),
               HARK_BACKEND__EMBEDDED__DEVICE="cuda", HARK_BACKEND__EMBEDDED__DTYPE=args.dtype,
               HARK_AUDIO__VAD="energy")
    proc = subprocess.Popen([args.bin, "serve", "--config", "config.yaml"], env=env)
    try:
        asyncio.run(session(port))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("gpu realtime smoke: ok")


if __name__ == "__main__":
    sys.exit(main())
