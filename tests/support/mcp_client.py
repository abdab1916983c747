"""The official MCP Python SDK's client (`mcp.Client`, streamable HTTP) as an agent uses it,
through whatever HTTP_PROXY the environment names, for tests/mcp.rs.

Usage: python3 mcp_client.py URL
Prints `NAME JSON` lines: the tools listed, then each call's outcome.
"""

import asyncio
import json
import sys

from mcp import Client


async def main(url):
    async with Client(url) as client:
        tools = await client.list_tools()
        print("tools", json.dumps(sorted(t.name for t in tools.tools)), flush=True)
        for name, args in [
            ("search_docs", {"query": "sidecar", "repo": "public"}),
            ("delete_repository", {"name": "prod"}),
        ]:
            try:
                r = await client.call_tool(name, args)
                text = r.content[0].text if r.content else ""
                print(name, json.dumps({"error": bool(r.is_error), "text": text}), flush=True)
            except Exception as e:  # noqa: BLE001 - the test reads what the agent would see
                print(name, json.dumps({"raised": type(e).__name__, "message": str(e)}), flush=True)


asyncio.run(main(sys.argv[1]))
