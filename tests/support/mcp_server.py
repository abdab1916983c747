"""An MCP server on loopback, with the official Python SDK (`mcp` 2.x, pinned in
requirements.txt): an MCPServer over streamable HTTP at /mcp with two tools, one harmless
(`search_docs`) and one dangerous (`delete_repository`), for tests/mcp.rs.

Usage: python3 mcp_server.py [--json] [--oauth ISSUER]
--json answers each POST with one JSON body instead of an SSE stream (both are streamable
HTTP). --oauth ISSUER protects the server as MCP's authorization spec says: it serves its
protected-resource metadata (RFC 9728) naming ISSUER, answers a request without a valid
token 401 with `WWW-Authenticate: Bearer resource_metadata=...`, and accepts only JWTs
signed by ISSUER's keys whose audience is this server's URL (RFC 8707) and that carry
`tools.read`.

Prints `ready PORT`, then `called NAME ARGS AUTHORIZATION` for every tool that actually ran,
so a test can tell a call refused by the proxy from one the server saw, and `rejected WHY`
for each token it refused.
"""

import argparse
import asyncio
import json
import socket

import jwt
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer


def called(name, args, ctx):
    auth = ""
    try:
        request = ctx.request_context.request
        auth = request.headers.get("authorization", "") if request is not None else ""
    except Exception:  # noqa: BLE001 - the header is a report, not a requirement
        auth = ""
    print("called", name, json.dumps(args), auth or "-", flush=True)


class JwtVerifier:
    """Tokens from ISSUER (its JWKS), for this server (`aud`), unexpired."""

    def __init__(self, issuer, resource):
        self.issuer = issuer
        self.resource = resource
        self.keys = jwt.PyJWKClient(f"{issuer}/jwks")

    async def verify_token(self, token):
        try:
            key = await asyncio.to_thread(self.keys.get_signing_key_from_jwt, token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["ES256", "RS256", "PS256"],
                audience=self.resource,
                issuer=self.issuer,
            )
        except Exception as e:  # noqa: BLE001 - any failure is a refused token
            print("rejected", type(e).__name__, str(e), flush=True)
            return None
        return AccessToken(
            token=token,
            client_id=claims.get("client_id", ""),
            scopes=claims.get("scope", "").split(),
            expires_at=claims.get("exp"),
            resource=self.resource,
            subject=claims.get("sub"),
        )


def build(port, issuer):
    kwargs = {}
    if issuer:
        resource = f"http://127.0.0.1:{port}/mcp"
        kwargs = {
            "token_verifier": JwtVerifier(issuer, resource),
            "auth": AuthSettings(
                issuer_url=issuer,
                resource_server_url=resource,
                required_scopes=["tools.read"],
                validate_token_resource=True,
            ),
        }
    server = MCPServer("tools", **kwargs)

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

    return server


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--oauth", metavar="ISSUER")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build(port, args.oauth)
    app = server.streamable_http_app(host="127.0.0.1", json_response=args.json)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"ready {port}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


asyncio.run(main())
