"""Amazon Bedrock Runtime on loopback, for tests/aws.rs: enough of InvokeModel and
InvokeModelWithResponseStream for boto3's `bedrock-runtime` client, with every request's
SigV4 signature checked the way AWS checks it, recomputed by botocore (the AWS SDK for
Python's own signer) from the request as received and the session credentials this server
hands out.

Usage: python3 fake_bedrock.py TOKEN

Serves, on one port:
- GET /v1/credentials with `Authorization: TOKEN`: a container credentials endpoint (as EKS
  Pod Identity serves one) handing out one fixed session;
- POST /model/ID/invoke: `{"completion": ..., "seen": ...}`;
- POST /model/ID/invoke-with-response-stream: five `chunk` events in AWS's event-stream
  framing (application/vnd.amazon.eventstream), 200 ms apart, the first carrying `seen`.

A request signed by anything but the session (a hard-coded key, a wrong signature, a body
changed after signing) gets 403 with Bedrock's error shape. `seen` says what was verified:
the access key id, the service and region of the credential scope, the signed headers.
Prints `ready PORT`, then `verified ...` or `refused ...` per model call.
"""

import base64
import json
import struct
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

TOKEN = sys.argv[1]
SESSION = Credentials(
    "ASIAFAKEBEDROCK00001",
    "fake/bedrock/secret/" + "k" * 20,
    "FwoGZXIvYXdzEFAKE" + "t" * 120,
)
GAP = 0.2
PARTS = 5


def header(name, value):
    """One event-stream header of type string (7)."""
    n, v = name.encode(), value.encode()
    return struct.pack("!B", len(n)) + n + struct.pack("!BH", 7, len(v)) + v


def event(payload):
    """One event-stream message: prelude with its CRC, headers, payload, message CRC."""
    headers = header(":event-type", "chunk") + header(":content-type", "application/json")
    headers += header(":message-type", "event")
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    prelude += struct.pack("!I", zlib.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + headers + payload
    return message + struct.pack("!I", zlib.crc32(message) & 0xFFFFFFFF)


def verify(handler, body):
    """Recompute the signature with botocore; the verified scope, or an error text."""
    auth = handler.headers.get("Authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return None, "no SigV4 Authorization"
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
    key_id, date, region, service, _ = fields["Credential"].split("/")
    if key_id != SESSION.access_key:
        return None, f"unknown access key {key_id[:4]}..."
    if handler.headers.get("X-Amz-Security-Token") != SESSION.token:
        return None, "wrong or missing security token"
    signed = fields["SignedHeaders"].split(";")
    headers = {h: handler.headers[h] for h in signed if handler.headers.get(h) is not None}
    request = AWSRequest(
        method=handler.command,
        url=f"http://{handler.headers['Host']}{handler.path}",
        data=body,
        headers=headers,
    )
    request.context["timestamp"] = handler.headers["X-Amz-Date"]
    signer = SigV4Auth(SESSION, service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != fields["Signature"]:
        return None, "SignatureDoesNotMatch"
    return {"key": key_id, "service": service, "region": region, "signed": signed}, None


class Bedrock(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/credentials" and self.headers.get("Authorization") == TOKEN:
            expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            body = {
                "AccessKeyId": SESSION.access_key,
                "SecretAccessKey": SESSION.secret_key,
                "Token": SESSION.token,
                "Expiration": expiry,
                "RoleArn": "arn:aws:iam::123456789012:role/bedrock-caller",
            }
            return self.send(200, "application/json", json.dumps(body).encode())
        self.send(401, "application/json", b'{"message":"unauthorized"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        seen, error = verify(self, body)
        if error:
            print("refused", error, flush=True)
            message = {"message": f"The request signature we calculated does not match: {error}"}
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-amzn-ErrorType", "UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/")
            data = json.dumps(message).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        print("verified", self.path, json.dumps(seen), flush=True)
        seen["path"] = self.path
        if self.path.endswith("/invoke"):
            out = {"completion": "hello", "seen": seen, "asked": json.loads(body or b"{}")}
            return self.send(200, "application/json", json.dumps(out).encode())
        if self.path.endswith("/invoke-with-response-stream"):
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.amazon.eventstream")
            self.send_header("X-Amzn-Bedrock-Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(PARTS):
                part = {"seen": seen} if i == 0 else {"part": i}
                data = event(json.dumps({"bytes": base64.b64encode(json.dumps(part).encode()).decode()}).encode())
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                time.sleep(GAP)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send(404, "application/json", b'{"message":"unknown operation"}')

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Bedrock)
print(f"ready {server.server_port}", flush=True)
server.serve_forever()
