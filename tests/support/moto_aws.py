"""AWS on loopback: PyPI moto in server mode with request authentication on, for tests/aws.rs.

Usage: python3 moto_aws.py [CERT KEY]   (with a certificate and key: HTTPS)
       python3 moto_aws.py --container TOKEN
           also a container credentials endpoint (as EKS Pod Identity serves one): it takes
           the role's session itself (the third unauthenticated action) and hands it to
           GETs that carry `Authorization: TOKEN`; prints `container PORT` before `ready`.

Creates the IAM role `inference` (trusting a web identity, allowed everything), then prints
`ready PORT`. Authentication is off for the setup actions and the sidecar's one
AssumeRoleWithWebIdentity only (moto, unlike AWS, wants that call signed once authentication
is on). Every request after that must carry a valid SigV4 signature by credentials moto
issued: a hard-coded key is refused (InvalidClientTokenId), a wrong signature too
(SignatureDoesNotMatch).

Environment (optional), for secret stores:
  SEED_SECRET=NAME=TEXT      a Secrets Manager secret NAME holding TEXT
  SEED_PARAMETER=NAME=TEXT   an SSM SecureString parameter NAME holding TEXT
With either, a control server prints `control PORT`: `POST /secret` with a body puts a new
version of the secret (as a rotation would), straight into moto's backend.
"""

import json
import os
import socket
import ssl
import sys
import threading

seed_secret = os.environ.get("SEED_SECRET", "").split("=", 1) if os.environ.get("SEED_SECRET") else None
seed_parameter = (
    os.environ.get("SEED_PARAMETER", "").split("=", 1) if os.environ.get("SEED_PARAMETER") else None
)
# Role and policy, each seed, and one AssumeRoleWithWebIdentity (the sidecar's, or in
# container mode this script's own).
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(3 + (seed_secret is not None) + (seed_parameter is not None))

import boto3  # noqa: E402
from moto.server import DomainDispatcherApplication, create_backend_app  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

container_token = None
if sys.argv[1:2] == ["--container"]:
    container_token = sys.argv[2]
    sys.argv = sys.argv[:1]
tls = None
if len(sys.argv) == 3:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[1], sys.argv[2])
app = DomainDispatcherApplication(create_backend_app)
server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=tls)
port = server.server_port
threading.Thread(target=server.serve_forever, daemon=True).start()


def setup_client(service):
    return boto3.client(
        service,
        endpoint_url=f"{'https' if tls else 'http'}://localhost:{port}",
        region_name="us-east-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="setup-only-" + "x" * 29,
        verify=False,
    )


iam = setup_client("iam")
trust = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/cluster"},
            "Action": "sts:AssumeRoleWithWebIdentity",
        }
    ],
}
iam.create_role(RoleName="inference", AssumeRolePolicyDocument=json.dumps(trust))
allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
iam.put_role_policy(RoleName="inference", PolicyName="all", PolicyDocument=json.dumps(allow_all))
if seed_secret:
    setup_client("secretsmanager").create_secret(Name=seed_secret[0], SecretString=seed_secret[1])
if seed_parameter:
    setup_client("ssm").put_parameter(Name=seed_parameter[0], Value=seed_parameter[1], Type="SecureString")
if seed_secret or seed_parameter:
    from http.server import BaseHTTPRequestHandler as _Handler, ThreadingHTTPServer as _Server

    from moto.backends import get_backend

    class Control(_Handler):
        def do_POST(self):
            text = self.rfile.read(int(self.headers["Content-Length"])).decode()
            backend = get_backend("secretsmanager")["123456789012"]["us-east-1"]
            backend.put_secret_value(
                secret_id=seed_secret[0],
                secret_string=text,
                secret_binary=None,
                client_request_token=None,
                version_stages=["AWSCURRENT"],
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    control = _Server(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(f"control {control.server_port}", flush=True)

if container_token is not None:
    import botocore
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sts = boto3.client(
        "sts",
        endpoint_url=f"http://localhost:{port}",
        region_name="us-east-1",
        config=botocore.config.Config(signature_version=botocore.UNSIGNED),
    )
    answer = sts.assume_role_with_web_identity(
        RoleArn="arn:aws:iam::123456789012:role/inference",
        RoleSessionName="pod-identity",
        WebIdentityToken="eyJhbGciOiJub25lIn0.e30.",
    )
    c = answer["Credentials"]
    body = json.dumps(
        {
            "AccessKeyId": c["AccessKeyId"],
            "SecretAccessKey": c["SecretAccessKey"],
            "Token": c["SessionToken"],
            "AccountId": "123456789012",
            "Expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ).encode()

    class Endpoint(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == container_token
            self.send_response(200 if ok else 401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body if ok else b'{"message":"unauthorized"}')

        def log_message(self, *args):
            pass

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    print(f"container {endpoint.server_port}", flush=True)
print(f"ready {port}", flush=True)
threading.Event().wait()
