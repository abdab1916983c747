"""An MCP server on loopback, with the official Python SDK (`mcp` 2.x, pinned in
requirements.txt): an MCPServer over streamable HTTP at /mcp with two tools, one harmless
(`search_docs`) and one dangerous (`delete_repository`), for tests/mcp.rs.

Usage: python3 mcp_server.py [json]
With `json`, answers each POST with one JSON body instead of an SSE stream (both are
streamable HTTP). Prints `ready PORT`, then `called NAME ARGS AUTHORIZATION` for every tool
that actually ran, so a test can tell a call refused by the proxy from one the server saw.
"""

import asyncio
import json
import socket
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("tools")


def called(name, args, ctx):
    auth = ""
    try:
        request = ctx.request_context.request
        auth = request.headers.get("authorization", "") if request is not None else ""
    except Exception:  # noqa: BLE001 - the header is a report, not a requirement
        auth = ""
    print("called", name, json.dumps(args), auth or "-", flush=True)


@server.tool()
def search_docs(query: str, ctx: Context, repo: str = "public") -> str:
    """Search the documentation."""
    called("search_docs", {"query": query, "repo": repo}, ctx)
    return f"3 results for {query} in {repo}"


@server.tool()
def delete_repository(name: str, ctx: Context) -> str:
    """Delete a repository. Dangerous."""
    called("delete_repository", {"name": name}, ctx)
    return f"deleted {name}"


async def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    json_response = sys.argv[1:] == ["json"]
    app = server.streamable_http_app(host="127.0.0.1", json_response=json_response)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"ready {port}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


asyncio.run(main())
