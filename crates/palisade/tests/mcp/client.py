"""An MCP agent for the tests: the official Python SDK over Streamable HTTP.

usage: client.py URL TOKEN CALLS_JSON [READS_JSON]
Initialises, lists tools, makes the calls (a call with "progress": true asks for progress
reports and records them), and prints one JSON object with what it saw. With
READS_JSON ({"resources": [uri, ...], "prompts": [name, ...]}) it also lists resources and
prompts and reads those ("<first>" stands for the first listed resource).
"""

import asyncio
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, calls_json: str, reads_json: str = "") -> None:
    calls = json.loads(calls_json)
    reads = json.loads(reads_json) if reads_json else None
    out: dict = {"calls": []}
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["protocol"] = init.protocol_version
                out["server"] = init.server_info.name
                tools = await session.list_tools()
                out["tools"] = sorted(t.name for t in tools.tools)
                for call in calls:
                    progress: list = []

                    async def on_progress(value, total, message, seen=progress):
                        seen.append([value, total])

                    try:
                        result = await session.call_tool(
                            call["name"],
                            call.get("arguments", {}),
                            progress_callback=on_progress if call.get("progress") else None,
                        )
                        texts = [c.text for c in result.content if getattr(c, "text", None) is not None]
                        seen = {"ok": True, "is_error": bool(result.is_error), "text": texts}
                        if call.get("progress"):
                            seen["progress"] = progress
                        out["calls"].append(seen)
                    except Exception as e:  # an MCP error answer
                        out["calls"].append({"ok": False, "error": str(e)})
                if reads is not None:
                    resources = await session.list_resources()
                    out["resources"] = sorted(str(r.uri) for r in resources.resources)
                    prompts = await session.list_prompts()
                    out["prompts"] = sorted(p.name for p in prompts.prompts)
                    out["reads"] = []
                    uris = [
                        (out["resources"][0] if out["resources"] else "none://") if u == "<first>" else u
                        for u in reads.get("resources", [])
                    ]
                    for uri in uris:
                        try:
                            r = await session.read_resource(uri)
                            out["reads"].append({"ok": True, "n": len(r.contents)})
                        except Exception as e:
                            out["reads"].append({"ok": False, "error": str(e)})
                    for name in reads.get("prompts", []):
                        try:
                            p = await session.get_prompt(name, {})
                            out["reads"].append({"ok": True, "n": len(p.messages)})
                        except Exception as e:
                            out["reads"].append({"ok": False, "error": str(e)})
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
