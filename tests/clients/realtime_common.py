"""Shared helpers for hark's OpenAI Realtime test clients.

Used by the driver scripts in this directory (e.g. ``realtime_vad.py``).  Only
the standard library and the official ``openai`` SDK (with the ``realtime``
extra) are needed; there is no numpy.

What lives here:

* connecting with the official SDK in either dialect (GA ``/v1/realtime`` or
  the retired beta protocol selected by the ``OpenAI-Beta: realtime=v1``
  header),
* recording every server message *raw* (exact bytes + monotonic arrival
  time) and parsing it ourselves, because the SDK's typed parsing is lenient
  and would hide protocol mistakes,
* envelope / dialect checks and ``expect_sequence``, a small strict ordering
  checker for event streams,
* WAV reading, ground-truth speech bounds and real-time paced streaming of
  ``input_audio_buffer.append`` events.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import sys
import time
import urllib.parse
import wave
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# ---------------------------------------------------------------------------
# Dialects and connecting
# ---------------------------------------------------------------------------

GA = "ga"
BETA = "beta"

# Server event names that exist in only one dialect (derived from the SDK's
# GA and beta RealtimeServerEvent unions).  Prefixes end with a dot.
GA_ONLY_NAMES = (
    "response.output_text.",
    "response.output_audio.",
    "response.output_audio_transcript.",
    "conversation.item.added",
    "conversation.item.done",
)
BETA_ONLY_NAMES = (
    "response.text.",
    "response.audio.",
    "response.audio_transcript.",
    "transcription_session.updated",
)


def ws_base_url(http_base_url: str) -> str:
    """``http://host:port/v1`` -> ``ws://host:port/v1`` (https -> wss)."""
    parts = urllib.parse.urlsplit(http_base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported base url scheme: {http_base_url!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def open_realtime(dialect: str, base_url: str, model: str):
    """Return ``(client, connection_manager)`` for ``async with manager as conn``.

    GA: ``client.realtime.connect(model=...)``; the SDK turns the http base
    URL into ``ws://.../v1/realtime?model=...`` and sends no OpenAI-Beta header.

    Beta: ``client.beta.realtime.connect(model=...)``.  In openai 3.57 that
    method does NOT take ``websocket_base_url``; it is a client constructor
    option, so we set it there.  (Without it the beta path hard-codes the
    ``wss`` scheme, which cannot reach a plain-ws local daemon.)  The beta
    manager always merges ``{"OpenAI-Beta": "realtime=v1"}`` into the
    handshake headers.
    """
    from openai import AsyncOpenAI

    if dialect == GA:
        client = AsyncOpenAI(base_url=base_url, api_key="x")
        return client, client.realtime.connect(model=model)
    if dialect != BETA:
        raise ValueError(f"unknown dialect {dialect!r}")
    client = AsyncOpenAI(base_url=base_url, api_key="x", websocket_base_url=ws_base_url(base_url))
    beta_realtime = getattr(getattr(client, "beta", None), "realtime", None)
    if beta_realtime is not None:
        return client, beta_realtime.connect(model=model)
    # Fallback for SDKs that dropped client.beta.realtime: the GA connect with
    # the beta header selects the beta dialect on the server just the same.
    return client, client.realtime.connect(model=model, extra_headers={"OpenAI-Beta": "realtime=v1"})


def handshake_header(conn: Any, name: str) -> Optional[str]:
    """Value of a header the client sent in the WebSocket upgrade request.

    Reads the SDK's private ``_connection`` (a websockets ClientConnection);
    returns None if that cannot be introspected.
    """
    ws = getattr(conn, "_connection", None)
    request = getattr(ws, "request", None)
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    return headers.get(name)


# ---------------------------------------------------------------------------
# Raw event recording
# ---------------------------------------------------------------------------


@dataclass
class Event:
    """One server message exactly as received."""

    index: int
    t: float  # time.monotonic() at arrival
    raw: bytes
    data: Any = None  # json.loads(raw), or None if it did not parse
    parse_error: Optional[str] = None

    @property
    def type(self) -> Optional[str]:
        if isinstance(self.data, dict) and isinstance(self.data.get("type"), str):
            return self.data["type"]
        return None

    def get(self, path: str, default: Any = None) -> Any:
        return dig(self.data, path, default)


_MISSING = object()


def dig(obj: Any, path: str, default: Any = None) -> Any:
    """``dig(ev, "item.content.0.type")``: dotted lookup through dicts/lists."""
    cur = obj
    for key in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(key, _MISSING)
        elif isinstance(cur, list) and key.isdigit() and int(key) < len(cur):
            cur = cur[int(key)]
        else:
            cur = _MISSING
        if cur is _MISSING:
            return default
    return cur


class ConnectionLost(Exception):
    pass


class EventRecorder:
    """Collects raw server events with arrival times; lets tasks wait on them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False
        self.close_reason: Optional[str] = None
        self._changed = asyncio.Event()

    def record(self, raw: bytes | str, t: Optional[float] = None) -> Event:
        t = time.monotonic() if t is None else t
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        ev = Event(index=len(self.events), t=t, raw=raw)
        try:
            ev.data = json.loads(raw)
        except ValueError as exc:
            ev.parse_error = str(exc)
        self.events.append(ev)
        self._changed.set()
        return ev

    def mark_closed(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        self._changed.set()

    def of_type(self, type_: str) -> list[Event]:
        return [e for e in self.events if e.type == type_]

    async def wait_until(self, cond: Callable[[list[Event]], bool]) -> None:
        """Block until ``cond(events)`` is true; raise if the socket closes first."""
        while not cond(self.events):
            if self.closed:
                raise ConnectionLost(self.close_reason or "connection closed")
            self._changed.clear()
            await self._changed.wait()

    async def receive_loop(self, conn: Any) -> None:
        """Read every message via ``conn.recv_bytes()`` (no SDK parsing)."""
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                raw = await conn.recv_bytes()
                self.record(raw, time.monotonic())
        except ConnectionClosed as exc:
            self.mark_closed(f"websocket closed: {exc}")
        except asyncio.CancelledError:
            self.mark_closed("receiver cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - report anything else as a loss
            self.mark_closed(f"receiver failed: {exc!r}")


def describe(ev: Event, t0: Optional[float] = None) -> str:
    """One-line summary of an event for timelines and failure messages."""
    when = f"{(ev.t - t0) * 1000:8.1f}ms" if t0 is not None else ""
    if ev.data is None:
        return f"#{ev.index:<3} {when} <unparseable: {ev.parse_error}> {ev.raw[:120]!r}"
    if not isinstance(ev.data, dict):
        return f"#{ev.index:<3} {when} <not an object> {ev.raw[:120]!r}"
    keys = (
        "item_id", "response_id", "audio_start_ms", "audio_end_ms", "output_index",
        "content_index", "delta", "text", "response.id", "response.status",
        "item.id", "item.role", "item.status", "error.message",
    )
    bits = []
    for k in keys:
        v = ev.get(k, _MISSING)
        if v is not _MISSING:
            bits.append(f"{k}={v!r}")
    return f"#{ev.index:<3} {when} {ev.type} " + " ".join(bits)


def timeline(events: list[Event], t0: Optional[float] = None) -> str:
    return "\n".join(describe(e, t0) for e in events)


# ---------------------------------------------------------------------------
# Whole-stream checks
# ---------------------------------------------------------------------------


def check_envelopes(events: list[Event]) -> list[str]:
    """Every message is a JSON object with non-empty string event_id and string type; no errors."""
    problems = []
    for ev in events:
        if ev.parse_error is not None:
            problems.append(f"event #{ev.index} is not JSON ({ev.parse_error}): {ev.raw[:200]!r}")
            continue
        if not isinstance(ev.data, dict):
            problems.append(f"event #{ev.index} is not a JSON object: {ev.raw[:200]!r}")
            continue
        eid = ev.data.get("event_id")
        if not isinstance(eid, str) or not eid:
            problems.append(f"event #{ev.index} ({ev.data.get('type')!r}) has bad event_id {eid!r}")
        if not isinstance(ev.data.get("type"), str):
            problems.append(f"event #{ev.index} has non-string type {ev.data.get('type')!r}")
        if ev.type == "error":
            problems.append(f"server sent error event #{ev.index}: {json.dumps(ev.data)[:400]}")
    return problems


def _name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in patterns)


def check_dialect_names(events: list[Event], dialect: str) -> list[str]:
    """No beta-only names in a GA session and no GA-only names in a beta session."""
    foreign = BETA_ONLY_NAMES if dialect == GA else GA_ONLY_NAMES
    return [
        f"event #{ev.index} {ev.type!r} does not belong to the {dialect} dialect"
        for ev in events
        if ev.type is not None and _name_matches(ev.type, foreign)
    ]


# ---------------------------------------------------------------------------
# Ordering: expect_sequence
# ---------------------------------------------------------------------------


class CheckFailed(AssertionError):
    pass


def expect(cond: bool, message: str) -> None:
    """Assertion for use inside Step checks (survives ``python -O``)."""
    if not cond:
        raise CheckFailed(message)


def expect_eq(actual: Any, expected: Any, what: str) -> None:
    expect(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


Ctx = dict[str, Any]


@dataclass
class Step:
    """One expected event in a sequence.

    type:   the event ``type`` this step consumes.
    where:  optional selector ``(event, ctx) -> bool``; events of this type it
            rejects are *not about this sequence* and are ignored (e.g. the
            assistant's ``conversation.item.added`` when we expect the user's).
    check:  optional ``(event, ctx) -> None`` that raises CheckFailed (use
            ``expect``/``expect_eq``); it may store values in ctx for later
            steps (ids, text).
    repeat: one-or-more consecutive events instead of exactly one.
    """

    type: str
    label: str = ""
    where: Optional[Callable[[Event, Ctx], bool]] = None
    check: Optional[Callable[[Event, Ctx], None]] = None
    repeat: bool = False

    def __post_init__(self) -> None:
        self.label = self.label or self.type

    def selects(self, ev: Event, ctx: Ctx) -> bool:
        return ev.type == self.type and (self.where is None or bool(self.where(ev, ctx)))


class SequenceError(AssertionError):
    def __init__(self, message: str, matched: dict[str, list[Event]]) -> None:
        super().__init__(message)
        self.matched = matched  # steps matched (and checked) before the failure


def expect_sequence(events: list[Event], steps: list[Step], ctx: Optional[Ctx] = None) -> dict[str, list[Event]]:
    """Strictly match ``events`` against ``steps`` in order.

    An event is *relevant* if some step selects it (same type, ``where`` true
    given the ctx built so far).  Irrelevant events are skipped, so unrelated
    traffic (session.updated, rate_limits.updated, ...) may interleave.  The
    relevant events must be exactly the steps in order: a relevant event
    arriving early, late, twice, or failing its step's check is an error, as
    is a step that never matched.  Returns ``{label: [matched events]}``.
    Raises SequenceError with a readable message and the partial matches.
    """
    ctx = {} if ctx is None else ctx
    matched: dict[str, list[Event]] = {s.label: [] for s in steps}
    idx = 0
    for ev in events:
        if not any(s.selects(ev, ctx) for s in steps):
            continue
        while True:
            cur = steps[idx] if idx < len(steps) else None
            if cur is not None and cur.selects(ev, ctx):
                if cur.check is not None:
                    try:
                        cur.check(ev, ctx)
                    except CheckFailed as exc:
                        raise SequenceError(f"step '{cur.label}', event #{ev.index}: {exc}", matched) from None
                matched[cur.label].append(ev)
                if not cur.repeat:
                    idx += 1
                break
            if cur is not None and cur.repeat and matched[cur.label]:
                idx += 1  # the repeat is satisfied; let the next step try this event
                continue
            expecting = f"'{cur.label}'" if cur is not None else "nothing more"
            raise SequenceError(f"unexpected {ev.type!r} (event #{ev.index}) while expecting {expecting}", matched)
    if idx < len(steps) and steps[idx].repeat and matched[steps[idx].label]:
        idx += 1
    if idx < len(steps):
        raise SequenceError(f"missing '{steps[idx].label}': stream ended after {len(events)} events", matched)
    return matched


# ---------------------------------------------------------------------------
# Audio: WAV reading, ground truth, paced streaming
# ---------------------------------------------------------------------------


@dataclass
class Wav:
    rate: int
    samples: array.array  # signed 16-bit, native order
    pcm: bytes = field(repr=False, default=b"")  # little-endian s16, as sent on the wire

    @property
    def duration_ms(self) -> float:
        return len(self.samples) * 1000.0 / self.rate


def read_wav_s16_mono(path: str) -> Wav:
    with wave.open(path, "rb") as w:
        if w.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono, got {w.getnchannels()} channels")
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit samples, got {8 * w.getsampwidth()}-bit")
        if w.getcomptype() != "NONE":
            raise ValueError(f"{path}: compressed WAV ({w.getcomptype()}) not supported")
        rate = w.getframerate()
        pcm = w.readframes(w.getnframes())
    samples = array.array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    return Wav(rate=rate, samples=samples, pcm=pcm)


@dataclass
class SpeechTruth:
    start_index: int
    end_index: int
    start_ms: float
    end_ms: float


def speech_truth(samples: array.array, rate: int, threshold: int = 400) -> SpeechTruth:
    """First and last sample with |x| > threshold, as indices and ms from file start."""
    start = next((i for i, x in enumerate(samples) if abs(x) > threshold), None)
    if start is None:
        raise ValueError(f"no sample exceeds |x| > {threshold}: the WAV has no speech")
    end = next(i for i in range(len(samples) - 1, -1, -1) if abs(samples[i]) > threshold)
    return SpeechTruth(start, end, start * 1000.0 / rate, end * 1000.0 / rate)


def pcm_chunks(pcm: bytes, samples_per_chunk: int) -> list[bytes]:
    """Split s16 PCM into chunks of samples_per_chunk (the last may be short)."""
    step = 2 * samples_per_chunk
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def stream_audio(
    conn: Any, pcm: bytes, rate: int, chunk_ms: int = 20, send_times: Optional[list[float]] = None
) -> list[float]:
    """Send ``input_audio_buffer.append`` events paced in real time.

    Chunk n (``rate*chunk_ms/1000`` samples, base64 of the raw s16le bytes) is
    sent no earlier than t0 + n*chunk_ms on the monotonic clock.  The time each
    send completed is appended to ``send_times`` (pass your own list to keep
    partial progress if the stream is cut short); it is also returned.
    """
    send_times = [] if send_times is None else send_times
    samples_per_chunk = rate * chunk_ms // 1000
    t0 = time.monotonic()
    for n, chunk in enumerate(pcm_chunks(pcm, samples_per_chunk)):
        delay = t0 + n * chunk_ms / 1000.0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode("ascii")})
        send_times.append(time.monotonic())
    return send_times
