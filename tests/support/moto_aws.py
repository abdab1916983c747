"""AWS on loopback: PyPI moto in server mode with request authentication on, for tests/aws.rs.

Usage: python3 moto_aws.py

Creates the IAM role `inference` (trusting a web identity, allowed everything), then prints
`ready PORT`. Authentication is off for the first three actions only: creating the role,
attaching its policy, and the sidecar's one AssumeRoleWithWebIdentity (moto, unlike AWS,
wants that call signed once authentication is on). Every request after that must carry a
valid SigV4 signature by credentials moto issued: a hard-coded key is refused
(InvalidClientTokenId), a wrong signature too (SignatureDoesNotMatch).
"""

import json
import os
import socket

os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()

iam = boto3.client(
    "iam",
    endpoint_url=f"http://127.0.0.1:{port}",
    region_name="us-east-1",
    aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
    aws_secret_access_key="setup-only-" + "x" * 29,
)
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
print(f"ready {port}", flush=True)
server._thread.join()
