#!/usr/bin/env bash
# RSS over a long run at half the measured capacity (issue 21, floor 3: RSS flat over 30
# minutes). Chaperone runs the whole pipeline (a hard-coded key stripped, Cedar, a static
# credential injected, a purpose-log line to a file) in front of an nginx upstream:
#   1. capacity: wrk, 64 connections, 5 s;
#   2. the soak: wrk paced to half that (each connection waits between requests), with the
#      sidecar's RSS read every 30 s.
# Every response is checked: wrk counts non-2xx answers and socket errors, and a run with any
# fails. Reported: the rate reached, RSS at each sample, and the growth from the end of the
# first five minutes (warm-up: pools, memos, allocator) to the end.
#
#   bash benches/soak.sh [--duration SECONDS]      (default 1800). Needs wrk and nginx.
#   CHAPERONE_BIN=path bash benches/soak.sh ...     (that binary, unbuilt). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_args "wrk nginx-light" "$@"
[ "$DUR" = 10 ] && DUR=1800
for tool in wrk nginx; do
  command -v $tool >/dev/null || { echo "$tool is needed: bash benches/soak.sh --install" >&2; exit 2; }
done
bench_binary
bench_workdir soak
UP=18901; CH=18900; ADMIN=18910; CONNS=64

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
credentials:
  static-key: { kind: static, from_env: BENCH_STATIC_KEY }
routes:
  - name: upstream
    match: { host: 127.0.0.1, port: $UP }
    credential: static-key
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose.jsonl }
YAML
BENCH_STATIC_KEY=bench-static-secret-value "$BIN" run --config "$W/ch.yaml" 2>"$W/ch.err" & CH_PID=$!; PIDS+=($CH_PID)
for port in $UP $CH; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
rss() { awk '/VmRSS/ {print $2}' "/proc/$CH_PID/status"; }

request_lua() { # DELAY_MS
  cat <<EOF
wrk.method = "GET"
wrk.path = "http://127.0.0.1:$UP/v1/models?stream=false"
wrk.headers["Host"] = "127.0.0.1:$UP"
wrk.headers["Authorization"] = "Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-"
wrk.headers["chaperone-purpose"] = "bench"
function delay() return $1 end
EOF
}
# wrk's summary -> "requests_per_second errors"
summary() {
  awk '/^Requests\/sec/ { rps = $2 }
    /Non-2xx or 3xx responses/ { errors += $NF }
    /Socket errors/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
    END { printf "%s %d\n", rps, errors }'
}

request_lua 0 > "$W/full.lua"
read -r cap cap_err < <(wrk -t2 -c$CONNS -d5s -s "$W/full.lua" "http://127.0.0.1:$CH" 2>/dev/null | summary)
[ "$cap_err" = 0 ] || { echo "FAILED: $cap_err errors while measuring capacity" >&2; exit 1; }
# Each connection waits CONNS/(cap/2) seconds between requests (less its own latency).
delay_ms=$(python3 -c "print(max(1, round($CONNS * 1000 / ($cap / 2))))")
request_lua "$delay_ms" > "$W/paced.lua"
echo "capacity ${cap} req/s at $CONNS connections; soak for ${DUR}s paced to about half (${delay_ms} ms between a connection's requests)"

wrk -t2 -c$CONNS -d"${DUR}s" -s "$W/paced.lua" "http://127.0.0.1:$CH" > "$W/wrk.out" 2>&1 & WRK=$!
start=$(date +%s)
: > "$W/rss.txt"
while kill -0 $WRK 2>/dev/null; do
  echo "$(( $(date +%s) - start )) $(rss)" >> "$W/rss.txt"
  sleep 30
done
wait $WRK || true
read -r rate errors < <(summary < "$W/wrk.out")
echo "$(( $(date +%s) - start )) $(rss)" >> "$W/rss.txt"
python3 - "$W/rss.txt" "$rate" "$errors" "$cap" <<'PY'
import sys
samples = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
rate, errors, cap = float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
print("RSS (MiB) every 30 s: " + " ".join(f"{kib / 1024:.1f}" for _, kib in samples))
warm = [kib for t, kib in samples if t >= 300] or [samples[-1][1]]
print(f"rate {rate:,.0f} req/s ({rate / cap:.2f} of capacity), {errors} errors")
print(f"RSS: first {samples[0][1] / 1024:.1f} MiB, max {max(k for _, k in samples) / 1024:.1f} MiB, "
      f"after warm-up {warm[0] / 1024:.1f} MiB, end {samples[-1][1] / 1024:.1f} MiB, "
      f"growth after warm-up {(samples[-1][1] - warm[0]) / 1024:+.1f} MiB")
if errors:
    print(f"FAILED: {errors} errors")
    sys.exit(1)
PY
