# Shared by the load scripts (sourced): argument parsing and the nginx upstream.

# bench_args "PACKAGES" ARGS...: `--install` installs the Debian PACKAGES first;
# `--duration SECONDS` sets DUR (default 10).
bench_args() {
  local packages=$1
  shift
  DUR=10
  while [ $# -gt 0 ]; do
    case "$1" in
      --install)
        # shellcheck disable=SC2086 # a list of package names
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null ;;
      --duration) DUR=$2; shift ;;
      *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
  done
}

# bench_binary: BIN is $CHAPERONE_BIN when set (an A/B of a binary built elsewhere, left
# unbuilt), else the release build, built first.
bench_binary() {
  if [ -n "${CHAPERONE_BIN:-}" ]; then
    BIN=$CHAPERONE_BIN
  else
    cargo build --release -q --bin chaperone
    BIN=${CARGO_TARGET_DIR:-target}/release/chaperone
  fi
}

# bench_workdir NAME: W, a fresh /tmp/chaperone-NAME.* directory, and PIDS, the background
# processes to stop; on exit they are killed and W removed.
bench_workdir() {
  W=$(mktemp -d "/tmp/chaperone-$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"' EXIT
}

# nginx_upstream DIR LISTEN: DIR/upstream.conf, an nginx (one worker, no access log)
# answering a small JSON body from memory on LISTEN.
nginx_upstream() {
  cat > "$1/upstream.conf" <<EOF2
worker_processes 1;
daemon off;
pid $1/upstream.pid;
error_log $1/upstream-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen $2;
    location / { default_type application/json; return 200 '{"ok":true,"model":"bench"}'; }
  }
}
EOF2
}

# container_credentials PORT: a container credentials endpoint on 127.0.0.1:PORT (as EKS Pod
# Identity serves one) handing out one fixed session, in the background (its pid in
# CREDS_PID); exports AWS_CONTAINER_CREDENTIALS_FULL_URI for an `aws` credential without
# role_arn, and returns once it listens.
container_credentials() {
  python3 - "$1" <<'PY' &
import json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"AccessKeyId": "ASIABENCHBENCHBENCH0", "SecretAccessKey": "bench/" + "s" * 34,
            "Token": "bench-session-token-" + "t" * 200,
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
  CREDS_PID=$!
  export AWS_CONTAINER_CREDENTIALS_FULL_URI="http://127.0.0.1:$1/v1/credentials"
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && break; sleep 0.05; done
}
