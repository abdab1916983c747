"""The official MCP Python SDK's client (`mcp.Client`, streamable HTTP) as an agent uses it,
through whatever HTTP_PROXY the environment names, for tests/mcp.rs.

Usage: python3 mcp_client.py URL [CALLS]
CALLS is a JSON list of [tool, arguments] pairs (default: one harmless and one dangerous
call). Prints `NAME JSON` lines: the tools listed, then each call's outcome (`NAME` is the
tool, and `#N` after it for a tool's second and later calls).
"""

import asyncio
import json
import sys

from mcp import Client


DEFAULT_CALLS = [
    ["search_docs", {"query": "sidecar", "repo": "public"}],
    ["delete_repository", {"name": "prod"}],
]


async def main(url, calls):
    seen = {}
    async with Client(url) as client:
        tools = await client.list_tools()
        print("tools", json.dumps(sorted(t.name for t in tools.tools)), flush=True)
        for name, args in calls:
            n = seen.get(name, 0)
            seen[name] = n + 1
            label = name if n == 0 else f"{name}#{n + 1}"
            try:
                r = await client.call_tool(name, args)
                text = r.content[0].text if r.content else ""
                print(label, json.dumps({"error": bool(r.is_error), "text": text}), flush=True)
            except Exception as e:  # noqa: BLE001 - the test reads what the agent would see
                print(label, json.dumps({"raised": type(e).__name__, "message": str(e)}), flush=True)


asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_CALLS))
