"""A gRPC server and client on loopback (PyPI grpcio, pinned in requirements.txt), for
tests/grpc.rs. No protobuf: the methods take and return raw bytes, which grpcio allows.

  python3 grpc_echo.py serve CERT KEY
      prints `plain PORT` (insecure) and `ready PORT` (TLS). Methods of chaperone.test.Echo:
      Say (unary: answers with what the call carried, as JSON) and Stream (server streaming:
      that JSON, then four more messages 200 ms apart).
  python3 grpc_echo.py call PROXY CA PLAIN_PORT TLS_PORT APP_KEY
      calls both methods over an insecure channel and over TLS (trusting CA), through PROXY
      (the grpc.http_proxy channel argument: grpcio tunnels every call with CONNECT), and
      prints `NAME JSON` per call.
"""

import json
import sys
import time
from concurrent import futures

import grpc

SERVICE = "chaperone.test.Echo"


def seen(context):
    md = dict(context.invocation_metadata())
    return json.dumps(
        {"key": md.get("x-api-key", ""), "auth": md.get("authorization", ""), "proto": "HTTP/2"}
    ).encode()


def say(request, context):
    return seen(context)


def stream(request, context):
    yield seen(context)
    for i in range(1, 5):
        time.sleep(0.2)
        yield f'"part {i}"'.encode()


def serve(cert, key):
    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handlers,))
    plain = server.add_insecure_port("127.0.0.1:0")
    with open(cert, "rb") as c, open(key, "rb") as k:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    tls = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"plain {plain}", flush=True)
    print(f"ready {tls}", flush=True)
    server.wait_for_termination()


def call(proxy, ca, plain_port, tls_port, key):
    options = [("grpc.http_proxy", proxy)]
    with open(ca, "rb") as f:
        trust = grpc.ssl_channel_credentials(root_certificates=f.read())
    channels = {
        "grpc-insecure": grpc.insecure_channel(f"127.0.0.1:{plain_port}", options=options),
        "grpc-tls": grpc.secure_channel(f"localhost:{tls_port}", trust, options=options),
    }
    for name, channel in channels.items():
        with channel:
            auth = ("authorization", "Bearer " + key)
            say_ = channel.unary_unary(f"/{SERVICE}/Say")
            answer = say_(b"hello", metadata=[auth, ("chaperone-purpose", "call")], timeout=20)
            print(name, json.dumps({"seen": json.loads(answer)}), flush=True)
            stream_ = channel.unary_stream(f"/{SERVICE}/Stream")
            first, times = None, []
            for message in stream_(b"hello", metadata=[auth, ("chaperone-purpose", "stream")], timeout=20):
                first = first or json.loads(message)
                times.append(time.monotonic())
            spread = (times[-1] - times[0]) * 1000
            print(f"{name}-stream", json.dumps({"seen": first, "parts": len(times), "spread_ms": spread}), flush=True)


if sys.argv[1] == "serve":
    serve(*sys.argv[2:4])
else:
    call(*sys.argv[2:7])
