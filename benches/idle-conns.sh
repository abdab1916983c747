#!/usr/bin/env bash
# Memory per idle client connection (issue 21, floor 3: 10,000 idle client connections cost
# at most 64 MiB more): N keep-alive connections each send one request through the whole
# pipeline (strip, policy, purpose log) to an nginx upstream, check that it is a 200, and then
# stay open and idle. The sidecar's RSS is read before, with all N open, and after they close.
# A run where any answer is not a 200 is a failure, not a number.
#
#   bash benches/idle-conns.sh [N]      (default 10000). Needs nginx. Not part of CI.
#   CHAPERONE_BIN=path bash benches/idle-conns.sh [N]   (that binary, unbuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
N=${1:-10000}
command -v nginx >/dev/null || { echo "nginx is needed (apt-get install nginx-light)" >&2; exit 2; }
bench_binary
bench_workdir idle
UP=18801; CH=18800; ADMIN=18810

nginx_upstream "$W" "127.0.0.1:$UP"
nginx -c "$W/upstream.conf" -e "$W/upstream-error.log" & PIDS+=($!)
cat > "$W/policy.cedar" <<'EOF2'
@id("bench-permit")
permit(principal, action, resource) when { context.purpose == "bench" };
EOF2
cat > "$W/ch.yaml" <<YAML
listen: 127.0.0.1:$CH
admin: 127.0.0.1:$ADMIN
identity: { id: spiffe://bench.local/ns/ml/sa/inference, workload: bench, environment: bench }
max_connections: $((N + 1000))
routes:
  - name: upstream
    match: { host: 127.0.0.1, port: $UP }
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose.jsonl }
YAML
"$BIN" run --config "$W/ch.yaml" 2>"$W/ch.err" & CH_PID=$!; PIDS+=($CH_PID)
for port in $UP $CH; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
rss() { awk '/VmRSS/ {print $2}' "/proc/$CH_PID/status"; }
anon() { awk '/RssAnon/ {print $2}' "/proc/$CH_PID/status"; }

python3 - "$CH" "$UP" "$N" "$CH_PID" <<'PY'
import resource, socket, sys, time
ch, up, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if hard < n + 100:
    sys.exit(f"the open-files limit ({hard}) is below {n} connections")
def status():
    f = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
    return int(f["VmRSS"].split()[0]), int(f["RssAnon"].split()[0])
req = (f"GET http://127.0.0.1:{up}/v1/models HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\n"
       "Chaperone-Purpose: bench\r\nAuthorization: Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-\r\n\r\n").encode()
time.sleep(0.5)
rss0, anon0 = status()
socks, bad = [], 0
for i in range(n):
    s = socket.create_connection(("127.0.0.1", ch))
    s.sendall(req)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        bad += 1
    socks.append(s)
time.sleep(2)
rss1, anon1 = status()
for s in socks:
    s.close()
time.sleep(2)
rss2, anon2 = status()
# The allocator returns freed pages lazily, on a later allocation: some traffic after the
# connections closed, as a sidecar keeps seeing.
for i in range(200):
    s = socket.create_connection(("127.0.0.1", ch))
    s.sendall(req)
    head = s.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        bad += 1
    s.close()
time.sleep(1)
rss3, anon3 = status()
print(f"{n} idle connections, {bad} answers not 200")
print(f"RSS: before {rss0 / 1024:.1f} MiB, with {n} open {rss1 / 1024:.1f} MiB "
      f"(+{(rss1 - rss0) / 1024:.1f} MiB, {(rss1 - rss0) * 1024 / n:.0f} bytes each), "
      f"after they closed {rss2 / 1024:.1f} MiB, after 200 more requests {rss3 / 1024:.1f} MiB")
print(f"anonymous: before {anon0 / 1024:.1f} MiB, with them open {anon1 / 1024:.1f} MiB, "
      f"after {anon2 / 1024:.1f} MiB, after 200 more requests {anon3 / 1024:.1f} MiB")
sys.exit(1 if bad else 0)
PY
lines=$(wc -l < "$W/purpose.jsonl")
echo "purpose log: $lines lines (expected $((N + 200)))"
[ "$lines" = "$((N + 200))" ] || { echo "FAILED: purpose-log lines" >&2; exit 1; }
