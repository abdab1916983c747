"""A model API on loopback, served by hypercorn (PyPI, pinned in requirements.txt) over TLS with
HTTP/2 and HTTP/1.1 by ALPN, and over plain HTTP/1.1 (also h2c), so the official SDKs can be
driven through Chaperone against a real HTTP/2 server.

Usage: python3 fake_llm.py CERT KEY

Prints `plain PLAIN_PORT`, then `ready TLS_PORT`, once listening. The shapes are the vendors'
documented wire formats, as small as the SDKs accept:

- POST /v1/chat/completions: OpenAI Chat Completions, JSON or (`"stream": true`) SSE chunks
  ending in `data: [DONE]`; also at Azure OpenAI's
  /openai/deployments/NAME/chat/completions?api-version=...;
- POST /v1/messages: Anthropic Messages, JSON or (`"stream": true`) the SSE event sequence
  message_start ... message_stop;
- GET /echo: what the request carried, as JSON;
- GET /sse: five SSE events.

Every answer carries what the server saw (`seen`: protocol, host, the `x-api-key` and
`authorization` headers, path, and the vendors' other key and version headers): in the first text of a completion or message, in /echo's
body, in /sse's first event. Streams send five parts 200 ms apart, so a test can tell a stream
relayed as it comes from one delivered in one piece.
"""

import asyncio
import json
import socket
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

GAP = 0.2
PARTS = 5


def seen(scope):
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    return json.dumps(
        {
            "proto": "HTTP/" + scope["http_version"],
            "host": headers.get("host", ""),
            "key": headers.get("x-api-key", ""),
            "auth": headers.get("authorization", ""),
            "path": scope["path"],
            "other": {
                k: headers[k]
                for k in ("api-key", "x-goog-api-key", "anthropic-version", "x-github-api-version")
                if k in headers
            },
        }
    )


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def respond(send, status, content_type, body):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def stream(send, events):
    """Send SSE `events` (each a complete `data: ...` or `event: ...` block), GAP apart."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(GAP)
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def chat(scope, request):
    model = request.get("model", "m")
    if not request.get("stream"):
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": seen(scope)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def chunk(delta, finish=None):
        return "data: " + json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        ) + "\n\n"

    events = [chunk({"role": "assistant", "content": seen(scope)})]
    events += [chunk({"content": f"part {i}"}) for i in range(1, PARTS)]
    events += [chunk({}, "stop") + "data: [DONE]\n\n"]
    return events


def messages(scope, request):
    model = request.get("model", "m")
    usage = {"input_tokens": 1, "output_tokens": 1}
    if not request.get("stream"):
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": seen(scope)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }

    def event(name, data):
        return f"event: {name}\ndata: {json.dumps(dict(type=name, **data))}\n\n"

    def delta(text):
        return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

    start = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    head = event("message_start", {"message": start})
    head += event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    events = [head + delta(seen(scope))]
    events += [delta(f"part {i}") for i in range(1, PARTS)]
    events += [
        event("content_block_stop", {"index": 0})
        + event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": PARTS}})
        + event("message_stop", {})
    ]
    return events


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    path, method = scope["path"], scope["method"]
    azure = path.startswith("/openai/deployments/") and path.endswith("/chat/completions")
    if method == "POST" and (path in ("/v1/chat/completions", "/v1/messages") or azure):
        request = json.loads(body or b"{}")
        out = chat(scope, request) if path.endswith("completions") else messages(scope, request)
        if isinstance(out, list):
            await stream(send, out)
        else:
            await respond(send, 200, b"application/json", json.dumps(out).encode())
    elif path == "/echo":
        await respond(send, 200, b"application/json", seen(scope).encode())
    elif path == "/sse":
        await stream(send, [f"data: {seen(scope)}\n\n"] + [f"data: part {i}\n\n" for i in range(1, PARTS)])
    else:
        await respond(send, 404, b"text/plain", b"not found\n")


def listening():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.set_inheritable(True)
    return s


async def main():
    tls, plain = listening(), listening()
    config = Config()
    config.certfile, config.keyfile = sys.argv[1], sys.argv[2]
    config.bind = [f"fd://{tls.fileno()}"]
    config.insecure_bind = [f"fd://{plain.fileno()}"]
    config.accesslog = None
    config.errorlog = "-"
    # `plain` first: the test harness returns at `ready`.
    print(f"plain {plain.getsockname()[1]}", flush=True)
    print(f"ready {tls.getsockname()[1]}", flush=True)
    await serve(app, config)


asyncio.run(main())
