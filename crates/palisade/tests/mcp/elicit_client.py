"""An MCP agent whose user answers elicitations: the official Python SDK over Streamable HTTP.

usage: elicit_client.py URL TOKEN CALL_JSON ANSWER
ANSWER (accept, decline or cancel) is what the user answers every elicitation. Prints one JSON
object: the elicitations seen (mode, message, url) and the call's outcome.
"""

import asyncio
import json
import sys

import httpx2
import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, call_json: str, answer: str) -> None:
    call = json.loads(call_json)
    out: dict = {"elicitations": []}

    async def on_elicit(context, params):
        out["elicitations"].append(
            {
                "mode": getattr(params, "mode", None),
                "message": params.message,
                "url": getattr(params, "url", None),
            }
        )
        if answer == "accept":
            return types.ElicitResult(action="accept", content={})
        return types.ElicitResult(action=answer)

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write, elicitation_callback=on_elicit) as session:
                await session.initialize()
                try:
                    result = await session.call_tool(call["name"], call.get("arguments", {}))
                    texts = [c.text for c in result.content if getattr(c, "text", None) is not None]
                    out["call"] = {"ok": True, "is_error": bool(result.is_error), "text": texts}
                except Exception as e:  # an MCP error answer
                    out["call"] = {"ok": False, "error": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
