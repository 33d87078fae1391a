"""The OpenAI Agents SDK for Python (`openai-agents`) as a real Realtime client of hark.

The agent declares one function tool of its own (`lookup_order`); hark's agent has
the `calculator` tool, which hark runs itself. The test's scripted model calls both
in one response. Prints one line `RESULT {json}` with what the SDK did and saw:
which tools it ran, the mcp_call items hark sent, the history, and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

ran: list[str] = []


@function_tool
def lookup_order(order_id: str) -> str:
    """Look up an order's status."""
    ran.append("lookup_order")
    return json.dumps({"order_id": order_id, "status": "shipped"})


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--final-text", required=True)
    ap.add_argument("--timeout-s", type=float, default=40)
    args = ap.parse_args()

    agent = RealtimeAgent(name="assistant", instructions="Help with orders.", tools=[lookup_order])
    runner = RealtimeRunner(agent, config={"model_settings": {"modalities": ["text"]}})
    session = await runner.run(model_config={"url": args.url, "api_key": "unused"})
    tool_starts: list[str] = []
    mcp_done: list[dict] = []
    errors: list[str] = []
    raw_types: list[str] = []
    final = None
    async with session:
        await session.send_message("What is 6 times 7, and where is order A1?")

        async def consume():
            nonlocal final
            async for event in session:
                if event.type == "tool_start":
                    tool_starts.append(event.tool.name)
                elif event.type == "error":
                    errors.append(str(event.error))
                elif event.type == "raw_model_event":
                    data = event.data
                    if data.type == "raw_server_event":
                        raw = data.data
                        raw_types.append(raw.get("type", ""))
                        if raw.get("type") == "response.output_item.done" and raw["item"].get("type") == "mcp_call":
                            mcp_done.append(raw["item"])
                        if raw.get("type") == "response.done":
                            for item in raw["response"].get("output", []):
                                for part in item.get("content") or []:
                                    if part.get("text") == args.final_text:
                                        final = part["text"]
                    elif data.type == "error":
                        errors.append(str(data.error))
                if final is not None:
                    return

        try:
            await asyncio.wait_for(consume(), args.timeout_s)
        except asyncio.TimeoutError:
            errors.append(f"no final answer within {args.timeout_s} s")
        history = []
        for item in session._history:
            d = item.model_dump()
            history.append({k: d.get(k) for k in ("type", "name", "output", "status", "role")})
    print("RESULT " + json.dumps({
        "ran": ran,
        "tool_starts": tool_starts,
        "mcp_done": mcp_done,
        "errors": errors,
        "final": final,
        "history": history,
        "raw_types": raw_types,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
