"""A WebSocket echo server on loopback (PyPI `websockets`, pinned in requirements.txt).

Usage: python3 ws_echo.py [CERT KEY]   (with a certificate and key: wss://)

Prints `ready PORT` once listening, and `handshake PATH` for each connection. Each connection first gets one text message, a JSON object
of what the handshake carried (path, the `x-api-key` and `authorization` headers, `host`), so
a test can check what the proxy injected and stripped (`sec-websocket-protocol` too: the
server picks `realtime` when offered, as OpenAI's Realtime API does). Then every message is echoed, except
`stream N MS`, answered by N messages `part I` sent MS milliseconds apart (to see that a
proxy relays them as they come), and `close`, after which the server closes normally. The
server never pings, so a silent connection stays silent.
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.server import serve


async def handler(ws):
    headers = ws.request.headers
    print(f"handshake {ws.request.path}", flush=True)
    await ws.send(
        json.dumps(
            {
                "path": ws.request.path,
                "host": headers.get("host", ""),
                "key": headers.get("x-api-key", ""),
                "auth": headers.get("authorization", ""),
                "protocols": headers.get("sec-websocket-protocol", ""),
            }
        )
    )
    async for message in ws:
        if isinstance(message, str) and message.startswith("stream "):
            _, n, gap = message.split()
            for i in range(int(n)):
                await ws.send(f"part {i}")
                await asyncio.sleep(int(gap) / 1000)
        elif message == "close":
            await ws.close()
        else:
            await ws.send(message)


def pick(_connection, offered):
    # Like OpenAI's Realtime API: speak `realtime` when offered, else no subprotocol.
    return "realtime" if "realtime" in offered else None


async def main():
    tls = None
    if len(sys.argv) == 3:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(sys.argv[1], sys.argv[2])
    async with serve(
        handler,
        "127.0.0.1",
        0,
        ssl=tls,
        ping_interval=None,
        select_subprotocol=pick,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        await server.serve_forever()


asyncio.run(main())
