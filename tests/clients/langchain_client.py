"""LangChain's ChatOpenAI (pip langchain-openai) pointed at hark: a plain call, a
streamed call, and bind_tools with a tool round trip. Prints `RESULT {json}`."""

from __future__ import annotations

import argparse
import json
import sys

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return json.dumps({"city": city, "temp_c": 18})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    args = ap.parse_args()
    llm = ChatOpenAI(base_url=args.base_url, api_key="unused", model="hark", max_retries=0, timeout=30)
    out = {"plain": llm.invoke("Say hello.").content}
    out["stream"] = "".join(chunk.content for chunk in llm.stream("Say hello again."))
    with_tools = llm.bind_tools([get_weather])
    messages = [HumanMessage("Weather in Paris?")]
    ai = with_tools.invoke(messages)
    out["tool_calls"] = [{"name": c["name"], "args": c["args"], "id": c["id"]} for c in ai.tool_calls]
    messages.append(ai)
    for c in ai.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]))
    out["after_tool"] = with_tools.invoke(messages).content
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
