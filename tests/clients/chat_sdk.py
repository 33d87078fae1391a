"""The official `openai` Python SDK's chat completions against hark.

Runs non-streaming and streaming completions (with usage), a message with an image
part and one with an audio part, and (with --tools) a tool round trip. Prints one
line `RESULT {json}` with what came back; the Rust test asserts on it and on what
reached the model.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import struct
import sys
import wave
import zlib

from openai import OpenAI


def png_data_url(w: int = 96, h: int = 48) -> str:
    raw = b"".join(b"\x00" + b"".join(bytes((x * 2 % 256, y * 4 % 256, 128)) for x in range(w)) for y in range(h))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def wav_b64(seconds: float = 1.0, rate: int = 22050) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i * 0.07))) for i in range(int(seconds * rate))))
    return base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="hark")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tools", action="store_true")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    out: dict = {}

    r = client.chat.completions.create(model=args.model, max_tokens=args.max_tokens, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ])
    out["plain"] = {"content": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                    "usage": r.usage.model_dump() if r.usage else None, "object": r.object, "id": r.id}

    stream = client.chat.completions.create(model=args.model, max_tokens=args.max_tokens, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Count to three."}])
    text, finish, usage, chunks = "", None, None, 0
    for c in stream:
        chunks += 1
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage.model_dump()
    out["stream"] = {"content": text, "finish": finish, "usage": usage, "chunks": chunks}

    r = client.chat.completions.create(model=args.model, max_tokens=args.max_tokens, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
    ]}])
    out["image"] = {"content": r.choices[0].message.content, "usage": r.usage.model_dump()}

    r = client.chat.completions.create(model=args.model, max_tokens=args.max_tokens, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What did I say?"},
        {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}},
    ]}])
    out["audio"] = {"content": r.choices[0].message.content, "usage": r.usage.model_dump()}

    if args.tools:
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        r = client.chat.completions.create(model=args.model, messages=messages, tools=tools)
        call = r.choices[0].message.tool_calls[0]
        out["tool_call"] = {"name": call.function.name, "arguments": json.loads(call.function.arguments), "finish": r.choices[0].finish_reason}
        messages.append(r.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18})})
        r = client.chat.completions.create(model=args.model, messages=messages, tools=tools)
        out["after_tool"] = r.choices[0].message.content

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        out["unknown_model"] = "accepted"
    except Exception as e:  # openai.NotFoundError
        out["unknown_model"] = type(e).__name__
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
