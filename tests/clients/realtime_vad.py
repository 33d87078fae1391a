#!/usr/bin/env python3
"""Server-VAD end-to-end check for hark, driven by the official openai SDK.

What it proves
--------------
A stock OpenAI Realtime client (``openai`` Python SDK, GA or beta dialect)
can stream a spoken utterance to hark's ``/v1/realtime`` WebSocket in real
time with ``server_vad`` turn detection, and hark:

* detects the utterance exactly once: one ``input_audio_buffer.speech_started``
  and one ``speech_stopped`` sharing an ``item_id``, whose ``audio_start_ms`` /
  ``audio_end_ms`` lie within ``--tolerance-ms`` of the ground truth measured
  from the WAV itself (first / last sample with |x| > 400);
* commits the buffer and adds the user item (``conversation.item.added`` in
  GA, ``conversation.item.created`` in beta) with that id, role user,
  content[0].type input_audio;
* auto-creates one response and streams it in the exact OpenAI order, with
  consistent ids and text (created -> output_item.added ->
  content_part.added -> text delta+ -> text done -> content_part.done ->
  output_item.done -> response.done), using the dialect's own event names
  and none of the other dialect's;
* sends only well-formed events (JSON objects with non-empty ``event_id``
  and string ``type``) and no ``error`` events.

Server messages are read raw (``conn.recv_bytes()`` + ``json.loads``), not via
the SDK's lenient typed parsing, so the exact JSON is what gets checked.
Wall-clock detection latencies are measured and reported but not asserted.

How it is run
-------------
A Rust integration test in hark starts the daemon plus a scripted
OpenAI-compatible backend (which supplies the response text), makes a WAV
with espeak-ng + sox, e.g.::

    espeak-ng -v en-us -w s.wav "what is the weather like today"
    sox s.wav -r 24000 -c 1 -b 16 -e signed out.wav pad 0.8 1.2

and then runs, once per dialect::

    /path/to/venv/bin/python tests/clients/realtime_vad.py \\
        --base-url http://127.0.0.1:PORT/v1 --dialect ga --wav out.wav \\
        --model hark-test --tolerance-ms 150 --timeout-s 40

Exit 0 and a final line ``RESULT {json}`` on success; a message on stderr
and exit 1 on any failure.  Needs only the stdlib and ``openai[realtime]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from realtime_common import (  # noqa: E402
    BETA,
    GA,
    Event,
    EventRecorder,
    SequenceError,
    Step,
    Wav,
    check_dialect_names,
    check_envelopes,
    expect,
    expect_eq,
    expect_sequence,
    handshake_header,
    open_realtime,
    read_wav_s16_mono,
    speech_truth,
    stream_audio,
    timeline,
)

SAMPLE_RATE = 24000
CHUNK_MS = 20  # 480 samples = 960 bytes per append
SPEECH_THRESHOLD = 400
SILENCE_DURATION_MS = 500
SETTLE_S = 0.3  # after response.done, keep listening briefly for stray events

VAD = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": SILENCE_DURATION_MS,
    "create_response": True,
    "interrupt_response": True,
}

# Per-dialect event names that differ.
NAMES = {
    GA: {
        "user_item": "conversation.item.added",
        "text_delta": "response.output_text.delta",
        "text_done": "response.output_text.done",
    },
    BETA: {
        "user_item": "conversation.item.created",
        "text_delta": "response.text.delta",
        "text_done": "response.text.done",
    },
}


class Failure(Exception):
    pass


# ---------------------------------------------------------------------------
# Client side of the session
# ---------------------------------------------------------------------------


def session_update(dialect: str) -> dict:
    if dialect == GA:
        session = {
            "type": "realtime",
            "output_modalities": ["text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "turn_detection": VAD}},
        }
    else:
        session = {"modalities": ["text"], "input_audio_format": "pcm16", "turn_detection": VAD}
    return {"type": "session.update", "session": session}


def check_handshake(conn: Any, dialect: str) -> None:
    """The beta dialect is selected by the OpenAI-Beta header; GA must not send it."""
    value = handshake_header(conn, "OpenAI-Beta")
    if value is None and handshake_header(conn, "Authorization") is None:
        return  # cannot introspect this SDK's websocket; nothing to check
    if dialect == BETA and value != "realtime=v1":
        raise Failure(f"beta connect sent OpenAI-Beta={value!r}, expected 'realtime=v1'")
    if dialect == GA and value is not None:
        raise Failure(f"GA connect unexpectedly sent OpenAI-Beta={value!r}")


def response_finished(events: list[Event]) -> bool:
    """True once a response.done has arrived after a speech_stopped."""
    stopped = False
    for ev in events:
        if ev.type == "input_audio_buffer.speech_stopped":
            stopped = True
        elif ev.type == "response.done" and stopped:
            return True
    return False


class Run:
    """What the session produced, filled in as it goes (survives timeouts)."""

    def __init__(self) -> None:
        self.recorder = EventRecorder()
        self.phase = "connecting"
        self.send_times: list[float] = []  # send_times[n]: chunk n fully sent

    @property
    def t0(self) -> Optional[float]:
        """When the first audio chunk went out (origin for timelines)."""
        return self.send_times[0] if self.send_times else None


async def drive(args: argparse.Namespace, wav: Wav, run: Run) -> None:
    """Connect, configure VAD, stream the WAV, wait for the response."""
    rec = run.recorder
    client, manager = open_realtime(args.dialect, args.base_url, args.model)
    tasks: list[asyncio.Task] = []
    try:
        async with manager as conn:
            check_handshake(conn, args.dialect)
            tasks.append(asyncio.create_task(rec.receive_loop(conn)))
            try:
                run.phase = "waiting for session.updated"
                await conn.send(session_update(args.dialect))
                await rec.wait_until(lambda evs: any(e.type in ("session.updated", "error") for e in evs))

                run.phase = "streaming audio / waiting for response.done after speech_stopped"
                sender = asyncio.create_task(stream_audio(conn, wav.pcm, wav.rate, CHUNK_MS, run.send_times))
                finished = asyncio.create_task(rec.wait_until(response_finished))
                tasks += [sender, finished]
                # Both must complete: the whole file is sent even if the reply is early.
                done, _ = await asyncio.wait({sender, finished}, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # re-raise a send failure or ConnectionLost
                await sender
                await finished

                run.phase = "settling after response.done"
                await asyncio.sleep(SETTLE_S)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await client.close()


# ---------------------------------------------------------------------------
# Assertions on the recorded stream
# ---------------------------------------------------------------------------


def expect_response_ids(ev: Event, ctx: dict, *, item: bool = True, content: bool = True) -> None:
    expect_eq(ev.get("response_id"), ctx["response_id"], "response_id")
    expect_eq(ev.get("output_index"), 0, "output_index")
    if item:
        expect_eq(ev.get("item_id"), ctx["assistant_item_id"], "item_id")
    if content:
        expect_eq(ev.get("content_index"), 0, "content_index")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def vad_steps(dialect: str) -> list[Step]:
    def started(ev: Event, ctx: dict) -> None:
        item_id = ev.get("item_id")
        expect(isinstance(item_id, str) and bool(item_id), f"item_id must be a non-empty string, got {item_id!r}")
        expect(_is_number(ev.get("audio_start_ms")), f"audio_start_ms not a number: {ev.get('audio_start_ms')!r}")
        ctx["user_item_id"] = item_id

    def stopped(ev: Event, ctx: dict) -> None:
        expect_eq(ev.get("item_id"), ctx["user_item_id"], "speech_stopped item_id (vs speech_started)")
        expect(_is_number(ev.get("audio_end_ms")), f"audio_end_ms not a number: {ev.get('audio_end_ms')!r}")

    def committed(ev: Event, ctx: dict) -> None:
        expect_eq(ev.get("item_id"), ctx["user_item_id"], "committed item_id")

    def is_user_item(ev: Event, ctx: dict) -> bool:
        return ev.get("item.id") == ctx.get("user_item_id") or ev.get("item.role") == "user"

    def user_item(ev: Event, ctx: dict) -> None:
        expect_eq(ev.get("item.id"), ctx["user_item_id"], "item.id")
        expect_eq(ev.get("item.type"), "message", "item.type")
        expect_eq(ev.get("item.role"), "user", "item.role")
        expect_eq(ev.get("item.content.0.type"), "input_audio", "item.content[0].type")

    return [
        Step("input_audio_buffer.speech_started", check=started),
        Step("input_audio_buffer.speech_stopped", check=stopped),
        Step("input_audio_buffer.committed", check=committed),
        # Only the user's item: GA servers also announce the assistant item this way.
        Step(NAMES[dialect]["user_item"], label="user item", where=is_user_item, check=user_item),
    ]


def response_steps(dialect: str, statuses: tuple[str, ...] = ("completed",)) -> list[Step]:
    def created(ev: Event, ctx: dict) -> None:
        rid = ev.get("response.id")
        expect(isinstance(rid, str) and bool(rid), f"response.id must be a non-empty string, got {rid!r}")
        expect_eq(ev.get("response.status"), "in_progress", "response.status")
        ctx["response_id"] = rid

    def item_added(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx, item=False, content=False)
        expect_eq(ev.get("item.type"), "message", "item.type")
        expect_eq(ev.get("item.role"), "assistant", "item.role")
        aid = ev.get("item.id")
        expect(isinstance(aid, str) and bool(aid), f"item.id must be a non-empty string, got {aid!r}")
        ctx["assistant_item_id"] = aid
        ctx["deltas"] = []

    def part_added(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx)
        expect_eq(ev.get("part.type"), "text", "part.type")

    def delta(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx)
        expect(isinstance(ev.get("delta"), str), f"delta must be a string, got {ev.get('delta')!r}")
        ctx["deltas"].append(ev.get("delta"))

    def text_done(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx)
        expect_eq(ev.get("text"), "".join(ctx["deltas"]), "text (vs concatenated deltas)")
        ctx["text"] = ev.get("text")

    def part_done(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx)
        expect_eq(ev.get("part.type"), "text", "part.type")
        expect_eq(ev.get("part.text"), ctx["text"], "part.text")

    def item_done(ev: Event, ctx: dict) -> None:
        expect_response_ids(ev, ctx, item=False, content=False)
        expect_eq(ev.get("item.id"), ctx["assistant_item_id"], "item.id")
        expect(ev.get("item.status") in statuses, f"item.status: expected one of {statuses}, got {ev.get('item.status')!r}")
        expect_eq(ev.get("item.content.0.text"), ctx["text"], "item.content[0].text")

    def done(ev: Event, ctx: dict) -> None:
        expect_eq(ev.get("response.id"), ctx["response_id"], "response.id")
        expect(ev.get("response.status") in statuses, f"response.status: expected one of {statuses}, got {ev.get('response.status')!r}")
        expect_eq(ev.get("response.output.0.content.0.text"), ctx["text"], "response.output[0].content[0].text")

    return [
        Step("response.created", check=created),
        Step("response.output_item.added", check=item_added),
        Step("response.content_part.added", check=part_added),
        Step(NAMES[dialect]["text_delta"], label="text delta", check=delta, repeat=True),
        Step(NAMES[dialect]["text_done"], label="text done", check=text_done),
        Step("response.content_part.done", check=part_done),
        Step("response.output_item.done", check=item_done),
        Step("response.done", check=done),
    ]


def latency_ms(arrival: float, send_times: list[float], sample_index: int, samples_per_chunk: int) -> Optional[float]:
    chunk = sample_index // samples_per_chunk
    if not send_times or chunk >= len(send_times):
        return None
    return (arrival - send_times[chunk]) * 1000.0


def evaluate(args: argparse.Namespace, wav: Wav, run: Run) -> tuple[list[str], dict]:
    events = run.recorder.events
    truth = speech_truth(wav.samples, wav.rate, SPEECH_THRESHOLD)
    problems = check_envelopes(events) + check_dialect_names(events, args.dialect)

    ctx: dict = {}
    statuses = ("completed", "incomplete") if args.accept_incomplete else ("completed",)
    try:
        matched = expect_sequence(events, vad_steps(args.dialect) + response_steps(args.dialect, statuses), ctx)
    except SequenceError as exc:
        problems.append(f"event order: {exc}")
        matched = exc.matched  # what did match (already checked) still gets reported

    result: dict = {
        "dialect": args.dialect,
        "truth_start_ms": round(truth.start_ms, 1),
        "truth_end_ms": round(truth.end_ms, 1),
    }
    started = matched.get("input_audio_buffer.speech_started", [])
    stopped = matched.get("input_audio_buffer.speech_stopped", [])
    if started and stopped:
        start_ms, end_ms = started[0].get("audio_start_ms"), stopped[0].get("audio_end_ms")
        start_err, end_err = start_ms - truth.start_ms, end_ms - truth.end_ms
        if abs(start_err) > args.tolerance_ms:
            problems.append(
                f"audio_start_ms={start_ms} is {start_err:+.1f} ms from truth {truth.start_ms:.1f} "
                f"(tolerance {args.tolerance_ms} ms)"
            )
        if abs(end_err) > args.tolerance_ms:
            problems.append(
                f"audio_end_ms={end_ms} is {end_err:+.1f} ms from truth {truth.end_ms:.1f} "
                f"(tolerance {args.tolerance_ms} ms)"
            )
        spc = wav.rate * CHUNK_MS // 1000
        started_lat = latency_ms(started[0].t, run.send_times, truth.start_index, spc)
        stopped_lat = latency_ms(stopped[0].t, run.send_times, truth.end_index, spc)
        result.update(
            audio_start_ms=start_ms,
            audio_end_ms=end_ms,
            start_err_ms=round(start_err, 1),
            end_err_ms=round(end_err, 1),
            started_latency_ms=None if started_lat is None else round(started_lat, 1),
            stopped_latency_ms=None if stopped_lat is None else round(stopped_lat - SILENCE_DURATION_MS, 1),
        )
    result["response_text"] = ctx.get("text")
    result["event_count"] = len(events)
    return problems, result


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    p.add_argument("--dialect", choices=[GA, BETA], required=True)
    p.add_argument("--wav", required=True, help="24 kHz mono s16 WAV with speech padded by silence")
    p.add_argument("--model", default="hark-test")
    p.add_argument("--tolerance-ms", type=float, default=150.0)
    p.add_argument("--timeout-s", type=float, default=40.0)
    p.add_argument(
        "--accept-incomplete",
        action="store_true",
        help="also accept a response that stopped at max_output_tokens (status 'incomplete'), as a random-weight model does",
    )
    return p.parse_args(argv)


def fail(problems: list[str], run: Optional[Run] = None, measured: Optional[dict] = None) -> int:
    print("FAIL: realtime_vad", file=sys.stderr)
    for msg in problems:
        print(f"  - {msg}", file=sys.stderr)
    if measured:
        print("measured: " + json.dumps(measured, sort_keys=True), file=sys.stderr)
    if run is not None and run.recorder.events:
        t0 = run.t0 if run.t0 is not None else run.recorder.events[0].t
        origin = "first audio chunk" if run.t0 is not None else "first server event"
        print(f"server events (ms relative to {origin}):", file=sys.stderr)
        print(timeline(run.recorder.events, t0), file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        wav = read_wav_s16_mono(args.wav)
        expect_eq(wav.rate, SAMPLE_RATE, f"{args.wav} sample rate")
        speech_truth(wav.samples, wav.rate, SPEECH_THRESHOLD)
    except (OSError, ValueError, AssertionError) as exc:
        return fail([f"bad --wav: {exc}"])

    run = Run()
    try:
        asyncio.run(asyncio.wait_for(drive(args, wav, run), timeout=args.timeout_s))
    except asyncio.TimeoutError:
        problems, measured = evaluate(args, wav, run)
        return fail([f"timed out after {args.timeout_s:g}s while {run.phase}"] + problems, run, measured)
    except Exception as exc:  # Failure, ConnectionLost, connect refused, handshake rejected, ...
        return fail([f"{type(exc).__name__} while {run.phase}: {exc}"], run)

    problems, result = evaluate(args, wav, run)
    if problems:
        return fail(problems, run, result)
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
