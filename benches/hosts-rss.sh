#!/usr/bin/env bash
# Memory per distinct destination host (issue 20.3): the sidecar's RSS before and after N
# requests to N new hosts, denied under 100 policies that no scope slices (each host would
# once have built its own policy set). Every answer is checked to be the 403 policy
# refusal; a run with any other status is a failure, not a number.
#
#   cargo build --release && bash benches/hosts-rss.sh [N]      (default 4000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4000}
BIN=target/release/chaperone
dir=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$dir"' EXIT
for i in $(seq 0 99); do
  echo "@id(\"p$i\") permit(principal, action, resource) when { context.path like \"/only-$i/*\" };"
done > "$dir/policy.cedar"
cat > "$dir/config.yaml" <<EOF2
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: { id: spiffe://bench/ns/b/sa/b, workload: bench, environment: bench }
policy: { file: $dir/policy.cedar }
log: { format: json, output: $dir/log.jsonl }
EOF2
"$BIN" run --config "$dir/config.yaml" > "$dir/out" 2>&1 &
PID=$!
for _ in $(seq 100); do grep -q "proxy listening" "$dir/out" && break; sleep 0.05; done
PROXY=$(grep -o 'proxy listening on http://[0-9.:]*' "$dir/out" | sed 's|.*http://||')
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
before=$(rss)
python3 - "$PROXY" "$N" <<'PY'
import socket, sys
host, port = sys.argv[1].split(":")
n = int(sys.argv[2])
s = socket.create_connection((host, int(port)))
f = s.makefile("rb")
bad = 0
for i in range(n):
    h = f"h{i}-{'x' * 200}.example.org"
    s.sendall(f"GET http://{h}/x HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
    status = int(f.readline().split()[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    f.read(length)
    if status != 403:
        bad += 1
print(f"{n} requests, {bad} not the expected 403")
sys.exit(1 if bad else 0)
PY
after=$(rss)
echo "RSS before ${before} KiB, after ${after} KiB, growth $(( (after - before) / 1024 )) MiB for $N new hosts"
