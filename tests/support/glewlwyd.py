#!/usr/bin/env python3
"""Debian's glewlwyd as a second, independent OAuth2 server for the tests.

Usage: glewlwyd.py PORT CLIENT_SECRET WORKDIR

Creates a fresh SQLite database from the package's schema, starts glewlwyd on 127.0.0.1:PORT,
then, through its admin API as a user would, adds an OpenID Connect plugin instance (`oidc`,
ES256 tokens, JWKS published) and a confidential client `chaperone` allowed the
client_credentials grant with scopes tools.read and tools.write. Prints "ready" when done,
then one line per line glewlwyd logs, and exits when glewlwyd does; glewlwyd dies with it.
"""

import gzip
import http.cookiejar
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

SCHEMA = "/usr/share/doc/glewlwyd/database/init.sqlite3.sql.gz"
BINARY = "/usr/bin/glewlwyd"


def die_with_parent():
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main():
    asked, secret, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    db = os.path.join(work, "glewlwyd.db")
    with gzip.open(SCHEMA, "rt") as f:
        sqlite3.connect(db).executescript(f.read())
    # Port 0: glewlwyd takes a fixed port (its issuer URL names it), so take a free one and,
    # should another process bind it first, start again on another.
    for _ in range(5):
        port = asked or free_port()
        proc, call = start(port, db, work)
        if wait_ready(proc, call):
            break
        if asked:
            break
    else:
        print("glewlwyd did not start on any port", file=sys.stderr)
        sys.exit(1)
    configure(port, secret, proc, call)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port, db, work):
    conf = os.path.join(work, "glewlwyd.conf")
    with open(conf, "w") as f:
        f.write(f"""
port={port}
bind_address="127.0.0.1"
external_url="http://127.0.0.1:{port}"
login_url="login.html"
api_prefix="api"
allow_origin="*"
log_mode="console"
log_level="{os.environ.get('GLEWLWYD_LOG', 'WARNING')}"
cookie_secure=0
session_expiration=3600
session_key="GLEWLWYD2_SESSION_ID"
admin_scope="g_admin"
profile_scope="g_profile"
user_module_path="/usr/lib/glewlwyd/user"
client_module_path="/usr/lib/glewlwyd/client"
user_auth_scheme_module_path="/usr/lib/glewlwyd/scheme"
plugin_module_path="/usr/lib/glewlwyd/plugin"
use_secure_connection=false
# glewlwyd 2.7 refuses to start without these two, even with secure connections off.
secure_connection_key_file="{work}/unused.key"
secure_connection_pem_file="{work}/unused.pem"
hash_algorithm="SHA512"
database = {{ type = "sqlite3"; path = "{db}"; }};
""")
    # The test harness stops this wrapper with SIGKILL, which no handler sees: glewlwyd is
    # told by the kernel to die with it (PR_SET_PDEATHSIG), or it outlives every test run.
    proc = subprocess.Popen([BINARY, f"--config-file={conf}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: (proc.kill(), sys.exit(0)))
    base = f"http://127.0.0.1:{port}/api"
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                         urllib.request.ProxyHandler({}))

    def call(method, path, body):
        req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=5) as r:
            return r.status

    return proc, call


def wait_ready(proc, call):
    """Log in as the admin; False when glewlwyd exited (its port was taken)."""
    deadline = time.time() + 20
    while True:
        try:
            call("POST", "/auth/", {"username": "admin", "password": "password"})
            return True
        except Exception:
            if proc.poll() is not None:
                print("glewlwyd exited:", proc.stdout.read(), file=sys.stderr)
                return False
            if time.time() > deadline:
                print("glewlwyd did not start:", file=sys.stderr)
                proc.kill()
                sys.exit(1)
            time.sleep(0.1)


def configure(port, secret, proc, call):
    """Set up the OIDC plugin, the scopes and the client, say ready, then relay the log."""
    # glewlwyd publishes a P-256 point's coordinates in its JWKS without their leading zero
    # bytes (RFC 7518 6.2.1.2 wants all 32), so for about one key in 128 a strict verifier
    # such as the test's builds the wrong key and rejects every token. Use a key whose x and
    # y both start with a non-zero byte.
    while True:
        key = subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout"],
                             capture_output=True, text=True, check=True).stdout
        der = subprocess.run(["openssl", "ec", "-pubout", "-outform", "DER"], input=key.encode(),
                             capture_output=True, check=True).stdout
        point = der[-65:]  # 0x04, x, y
        if point[0] == 4 and point[1] != 0 and point[33] != 0:
            break
    pub = subprocess.run(["openssl", "ec", "-pubout"], input=key, capture_output=True,
                         text=True, check=True).stdout
    call("POST", "/mod/plugin/", {
        "module": "oidc", "name": "oidc", "display_name": "OpenID Connect", "enabled": True,
        "parameters": {
            "iss": f"http://127.0.0.1:{port}",
            "jwt-type": "ecdsa", "jwt-key-size": "256", "key": key, "cert": pub,
            "jwks-show": True,
            "access-token-duration": int(os.environ.get("TOKEN_TTL", "120")),
            "refresh-token-duration": 3600, "code-duration": 600,
            "allow-non-oidc": True,
            "auth-type-client-enabled": True, "auth-type-code-enabled": True,
            "auth-type-token-enabled": False, "auth-type-implicit-enabled": False,
            "auth-type-password-enabled": False, "auth-type-refresh-enabled": False,
            "auth-type-device-enabled": False,
        },
    })
    for scope in ("tools.read", "tools.write"):
        call("POST", "/scope/", {"name": scope, "display_name": scope, "description": scope,
                                 "password_required": False, "scheme": {}})
    call("POST", "/client/", {
        "client_id": "chaperone", "client_name": "chaperone", "client_secret": secret,
        "confidential": True, "enabled": True,
        "authorization_type": ["client_credentials"],
        "token_endpoint_auth_method": ["client_secret_basic", "client_secret_post"],
        "scope": ["tools.read", "tools.write"],
    })
    print(f"ready {port}", flush=True)
    for line in proc.stdout:
        print(line.rstrip(), flush=True)
    sys.exit(proc.wait())


if __name__ == "__main__":
    main()
