#!/usr/bin/env python3
"""Spoken replies through the official openai SDK.

The client asks for audio output (GA ``output_modalities: ["audio"]``, beta
``modalities: ["audio", "text"]``), sends one text message and asks for a
response, and reads every server message raw.  It checks that

* the reply's content part is an audio part (``output_audio`` / beta ``audio``);
* audio deltas arrive (``response.output_audio.delta`` / ``response.audio.delta``),
  each valid base64 of 16-bit PCM, and no text deltas;
* the transcript deltas join to the ``…transcript.done`` transcript, which is
  also the transcript of the item in ``response.done``;
* ``response.done`` comes after the last audio delta, status ``completed``;
* the envelope and dialect rules hold (``event_id`` on every event, no errors).

Optionally (``--cancel-after-first-audio``) it cancels the response once audio
starts and checks that audio stops and the response ends ``cancelled``.

It prints ``RESULT {json}`` with the decoded audio (written to ``--out`` as a
24 kHz WAV), its duration and RMS, the transcript, and latencies.  The Rust
test asserts on those numbers (non-silent, plausible duration) and the text.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import math
import os
import sys
import time
import wave

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from realtime_common import (  # noqa: E402
    BETA,
    GA,
    EventRecorder,
    check_dialect_names,
    check_envelopes,
    open_realtime,
    timeline,
)

NAMES = {
    GA: {
        "audio_delta": "response.output_audio.delta",
        "audio_done": "response.output_audio.done",
        "tr_delta": "response.output_audio_transcript.delta",
        "tr_done": "response.output_audio_transcript.done",
        "text_delta": "response.output_text.delta",
        "part": "output_audio",
    },
    BETA: {
        "audio_delta": "response.audio.delta",
        "audio_done": "response.audio.done",
        "tr_delta": "response.audio_transcript.delta",
        "tr_done": "response.audio_transcript.done",
        "text_delta": "response.text.delta",
        "part": "audio",
    },
}


class Failure(Exception):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failure(msg)


async def drive(args: argparse.Namespace, rec: EventRecorder) -> dict:
    n = NAMES[args.dialect]
    client, manager = open_realtime(args.dialect, args.base_url, args.model)
    result: dict = {}
    try:
        async with manager as conn:
            recv = asyncio.create_task(rec.receive_loop(conn))
            try:
                if args.dialect == GA:
                    session = {"type": "realtime", "output_modalities": ["audio"], "audio": {"input": {"turn_detection": None}}}
                else:
                    session = {"modalities": ["audio", "text"], "turn_detection": None}
                await conn.send({"type": "session.update", "session": session})
                await rec.wait_until(lambda evs: any(e.type in ("session.updated", "error") for e in evs))
                await conn.send({
                    "type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": args.prompt}]},
                })
                t_create = time.monotonic()
                await conn.send({"type": "response.create"})
                if args.cancel_after_first_audio:
                    await rec.wait_until(lambda evs: any(e.type == n["audio_delta"] for e in evs))
                    t_cancel = time.monotonic()
                    await conn.send({"type": "response.cancel"})
                    result["t_cancel"] = t_cancel
                await rec.wait_until(lambda evs: any(e.type == "response.done" for e in evs))
                result["t_create"] = t_create
            finally:
                recv.cancel()
                await asyncio.gather(recv, return_exceptions=True)
    finally:
        await client.close()
    return result


def analyse(args: argparse.Namespace, rec: EventRecorder, times: dict) -> dict:
    n = NAMES[args.dialect]
    evs = rec.events
    problems = check_envelopes(evs) + check_dialect_names(evs, args.dialect)
    check(not problems, "\n".join(problems))
    check(not any(e.type == n["text_delta"] for e in evs), "text deltas sent to a client that asked for audio")

    part = next(e for e in evs if e.type == "response.content_part.added")
    check(part.get("part.type") == n["part"], f"content part type {part.get('part.type')!r}, expected {n['part']!r}")
    item_id = part.get("item_id")

    audio_evs = [e for e in evs if e.type == n["audio_delta"]]
    check(audio_evs, f"no {n['audio_delta']} events")
    pcm = bytearray()
    for e in audio_evs:
        for k in ("event_id", "response_id", "item_id", "output_index", "content_index", "delta"):
            check(k in e.data, f"{e.type} without {k}: {str(e.data)[:200]}")
        check(e.get("item_id") == item_id, "audio delta for another item")
        chunk = base64.b64decode(e.get("delta"), validate=True)
        check(len(chunk) % 2 == 0, "odd-length pcm16 chunk")
        pcm += chunk
    samples = array.array("h")
    samples.frombytes(bytes(pcm))
    if sys.byteorder == "big":
        samples.byteswap()
    rms = math.sqrt(sum(s * s for s in samples) / max(1, len(samples))) / 32768.0
    peak = max((abs(s) for s in samples), default=0) / 32768.0
    if args.out:
        with wave.open(args.out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes(bytes(pcm))

    tr_deltas = "".join(e.get("delta") for e in evs if e.type == n["tr_delta"])
    tr_done = [e for e in evs if e.type == n["tr_done"]]
    done = [e for e in evs if e.type == "response.done"][-1]
    status = done.get("response.status")
    out_items = done.get("response.output") or []
    item_transcript = None
    if out_items and out_items[0].get("content"):
        c = out_items[0]["content"][0]
        check(c.get("type") == n["part"], f"response.done content type {c.get('type')!r}")
        item_transcript = c.get("transcript")
    check(evs.index(done) > evs.index(audio_evs[-1]), "audio after response.done")
    if not args.cancel_after_first_audio:
        check(status == "completed", f"response status {status!r}")
        check(len(tr_done) == 1, f"{len(tr_done)} transcript done events")
        check(tr_done[0].get("transcript") == tr_deltas, f"transcript deltas {tr_deltas!r} != done {tr_done[0].get('transcript')!r}")
        check(item_transcript == tr_deltas, f"item transcript {item_transcript!r} != {tr_deltas!r}")
        check(any(e.type == n["audio_done"] for e in evs), f"no {n['audio_done']}")
    else:
        check(status == "cancelled", f"response status {status!r} after cancel")

    t_first_audio = audio_evs[0].t
    res = {
        "samples": len(samples),
        "duration_ms": len(samples) / 24.0,
        "rms": rms,
        "peak": peak,
        "transcript": tr_deltas,
        "item_transcript": item_transcript,
        "status": status,
        "audio_deltas": len(audio_evs),
        "create_to_first_audio_ms": (t_first_audio - times["t_create"]) * 1000.0,
        "create_to_done_ms": (done.t - times["t_create"]) * 1000.0,
    }
    if "t_cancel" in times:
        res["audio_deltas_after_cancel"] = sum(1 for e in audio_evs if e.t > times["t_cancel"] + 0.2)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--dialect", choices=[GA, BETA], default=GA)
    ap.add_argument("--model", default="hark-test")
    ap.add_argument("--prompt", default="Say something.")
    ap.add_argument("--out", default="")
    ap.add_argument("--timeout-s", type=float, default=60)
    ap.add_argument("--cancel-after-first-audio", action="store_true")
    args = ap.parse_args()
    rec = EventRecorder()
    try:
        times = asyncio.run(asyncio.wait_for(drive(args, rec), args.timeout_s))
        res = analyse(args, rec, times)
    except (Failure, AssertionError, asyncio.TimeoutError, StopIteration) as exc:
        t0 = rec.events[0].t if rec.events else None
        print(f"FAILED: {type(exc).__name__}: {exc}\n{timeline(rec.events, t0)}", file=sys.stderr)
        return 1
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
