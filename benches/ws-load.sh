#!/usr/bin/env bash
# WebSocket load on loopback: round trips of 128-byte messages over many connections, direct
# to a ws echo server and through Chaperone (ws:// in absolute form, the handshake through the
# whole pipeline: strip, policy, credential injected; then the relay), alternated twice. Every
# echo is checked; a run with any error is reported FAILED, not as a speed. Also checks the
# purpose log: one line per connection, status 101, bytes each way.
#
# Usage: bash benches/ws-load.sh [--duration SECONDS] [--connections N]
# Needs node and the npm packages tests/run.sh installs (tests/support/node_modules).
# Not part of CI; results go into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=10; CONNS=64
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DUR=$2; shift ;;
    --connections) CONNS=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -d tests/support/node_modules/ws ] || npm ci --prefix tests/support --no-audit --no-fund --loglevel=error

cargo build --release -q --bin chaperone
BIN=${CARGO_TARGET_DIR:-target}/release/chaperone
W=$(mktemp -d /tmp/chaperone-ws.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT

node benches/ws_load.mjs serve > "$W/echo.out" & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$W/echo.out" 2>/dev/null && break; sleep 0.1; done
ECHO=$(awk '/ready/ {print $2}' "$W/echo.out")

CH=18401
cat > "$W/policy.cedar" <<'POL'
@id("bench-websocket")
permit(principal, action, resource) when { context.upgrade == "websocket" };
POL
cat > "$W/ch.yaml" <<CFG
listen: 127.0.0.1:$CH
admin: 127.0.0.1:18411
identity: { id: spiffe://bench.local/ns/ml/sa/agent, workload: bench, environment: bench }
credentials:
  static-key: { kind: static, from_env: BENCH_STATIC_KEY }
routes:
  - name: realtime
    match: { host: 127.0.0.1, port: $ECHO }
    credential: static-key
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose.jsonl }
CFG
# WORKERS=N sets the sidecar's worker threads (default: one per CPU).
[ -n "${WORKERS:-}" ] && echo "workers: $WORKERS" >> "$W/ch.yaml"
BENCH_STATIC_KEY=bench-static-secret-value "$BIN" run --config "$W/ch.yaml" 2>"$W/ch.err" & CH_PID=$!; PIDS+=($CH_PID)
# The sidecar's CPU (user + system) over a run, from /proc: per message relayed.
ticks() { awk '{print $14 + $15}' "/proc/$CH_PID/stat"; }
for _ in $(seq 50); do curl -sf "http://127.0.0.1:18411/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

status=0
printf '%-12s %10s %10s %10s %10s %12s %s\n' target msgs/s p50_us p99_us messages chaperone_cpu result
for round in 1 2; do
  for target in direct chaperone; do
    proxy=""; [ "$target" = chaperone ] && proxy="http://127.0.0.1:$CH"
    T0=$(ticks)
    if out=$(node benches/ws_load.mjs run "ws://127.0.0.1:$ECHO/v1/realtime" "$CONNS" "$DUR" $proxy); then
      result=ok
    else
      result="FAILED (errors: $(echo "$out" | sed -n 's/.*"errors":\([0-9]*\).*/\1/p'))"; status=1
    fi
    read -r msgs p50 p99 n < <(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["msgs_per_s"], d["p50_us"], d["p99_us"], d["messages"])')
    # Each message crosses the relay twice (to the echo server and back).
    cpu=-; [ "$target" = chaperone ] && cpu="$(awk -v t=$(( $(ticks) - T0 )) -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')us/msg"
    if [ "$result" = ok ]; then
      printf '%-12s %10s %10s %10s %10s %12s %s\n' "$target#$round" "$msgs" "$p50" "$p99" "$n" "$cpu" ok
    else
      printf '%-12s %10s %10s %10s %10s %12s %s\n' "$target#$round" - - - "$n" - "$result"
    fi
  done
done

# The purpose log: a line per proxied connection, each a relayed WebSocket.
sleep 0.3
python3 - "$W/purpose.jsonl" "$CONNS" <<'PY' || status=1
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ws = [l for l in lines if l.get("upgrade")]
bad = [l for l in ws if l["status"] != 101 or l["completion"] != "complete" or not l["upgrade"]["bytes_in"]]
print(f"purpose log: {len(ws)} WebSocket lines (expected {2 * int(sys.argv[2])}), {len(bad)} not complete")
sys.exit(0 if len(ws) == 2 * int(sys.argv[2]) and not bad else 1)
PY
exit $status
