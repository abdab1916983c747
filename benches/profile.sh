#!/usr/bin/env bash
# Where a proxied request's time goes: Chaperone on the whole pipeline (a hard-coded key
# stripped, Cedar, a static credential injected, a purpose-log line to a file) under wrk
# against an nginx upstream, as benches/load.sh runs it, with
#   - its CPU per request (utime + stime from /proc/PID/stat over the run),
#   - a `perf record -e cpu-clock` profile, the top symbols by self time,
#   - optionally (`--strace`), syscalls per request.
# With `--new-conns`, every request asks `Connection: close`, so each is a new connection
# (clients without a pool: curl per call, `requests.get` without a session).
# Every response is checked: a run with non-2xx answers or socket errors fails.
#
# Usage: [CHAPERONE_BIN=path] bash benches/profile.sh [--install] [--duration SECONDS] [--conns N] [--new-conns] [--jwt] [--strace] [--no-perf]
#   --jwt: the route injects a JWT minted per call instead of the static key.
#   (default 5 s, 64 connections). Needs wrk, nginx and perf. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
CONNS=64; STRACE=0; PERF=1; CLOSE=0; CRED=static-key; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) CONNS=$2; shift ;;
    --strace) STRACE=1 ;;
    --no-perf) PERF=0 ;;
    --new-conns) CLOSE=1 ;;
    --jwt) CRED=per-call ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
bench_args "wrk nginx-light linux-perf strace" "${ARGS[@]:-}"
THREADS=$(( CONNS < 2 ? CONNS : 2 ))  # wrk needs a connection per thread
[ "$DUR" = 10 ] && DUR=5
for tool in wrk nginx perf; do
  command -v $tool >/dev/null || { echo "$tool is needed: bash benches/profile.sh --install" >&2; exit 2; }
done
# CHAPERONE_BIN=path profiles that binary instead (an A/B of two builds, run alternately).
bench_binary
bench_workdir profile
UP=18500; CH=18501

nginx_upstream "$W" "127.0.0.1:$UP"
nginx -c "$W/upstream.conf" -e "$W/upstream-error.log" & PIDS+=($!)
cat > "$W/policy.cedar" <<'EOF'
@id("bench-permit")
permit(principal, action, resource) when { context.purpose == "bench" && principal.environment == "bench" };
@id("no-export")
forbid(principal, action, resource) when { context.purpose == "export-data" };
EOF
cat > "$W/chaperone.yaml" <<EOF
listen: 127.0.0.1:$CH
admin: 127.0.0.1:18511
identity: { id: spiffe://bench.local/ns/ml/sa/inference, workload: bench, environment: bench }
credentials:
  static-key: { kind: static, from_env: BENCH_STATIC_KEY }
  per-call: { kind: jwt, ttl: 60s }
routes:
  - name: upstream
    match: { host: 127.0.0.1, port: $UP }
    credential: $CRED
    scopes: [model.invoke]
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose.jsonl }
EOF
# WORKERS=N sets the sidecar's worker threads (default: one per CPU).
[ -n "${WORKERS:-}" ] && echo "workers: $WORKERS" >> "$W/chaperone.yaml"
BENCH_STATIC_KEY=bench-static-secret-value "$BIN" run --config "$W/chaperone.yaml" 2>"$W/chaperone.err" & CH_PID=$!; PIDS+=($CH_PID)
for port in $UP $CH; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done
cat > "$W/req.lua" <<EOF
wrk.method = "GET"
wrk.path = "http://127.0.0.1:$UP/v1/models?stream=false"
wrk.headers["Host"] = "127.0.0.1:$UP"
wrk.headers["Authorization"] = "Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-"
wrk.headers["chaperone-purpose"] = "bench"
wrk.headers["Accept"] = "application/json"
EOF
[ "$CLOSE" = 1 ] && echo 'wrk.headers["Connection"] = "close"' >> "$W/req.lua"
code=$(curl -s -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$CH" -H 'chaperone-purpose: bench' "http://127.0.0.1:$UP/v1/models")
[ "$code" = 200 ] || { echo "chaperone answered $code; not profiling" >&2; cat "$W/chaperone.err" >&2; exit 1; }
# Warm up (pools, caches), then measure.
wrk -t"$THREADS" -c"$CONNS" -d1s -s "$W/req.lua" "http://127.0.0.1:$CH" >/dev/null 2>&1
ticks() { awk '{print $14 + $15}' "/proc/$CH_PID/stat"; }
T0=$(ticks)
if [ "$PERF" = 1 ]; then
  perf record -q -e cpu-clock -F 999 -g -p "$CH_PID" -o "$W/perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
  PERF_PID=$!
fi
if [ "$STRACE" = 1 ]; then
  strace -c -f -p "$CH_PID" -o "$W/strace.txt" & STRACE_PID=$!
fi
wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency -s "$W/req.lua" "http://127.0.0.1:$CH" > "$W/wrk.txt" 2>&1
T1=$(ticks)
[ "$PERF" = 1 ] && { wait $PERF_PID || true; }
[ "$STRACE" = 1 ] && { kill -INT $STRACE_PID 2>/dev/null || true; wait $STRACE_PID 2>/dev/null || true; }
REQS=$(awk '/requests in/ {print $1}' "$W/wrk.txt")
ERRS=$(awk '/Non-2xx or 3xx responses/ {e+=$NF} /Socket errors/ {gsub(/,/,""); e+=$4+$6+$8+$10} END {print e+0}' "$W/wrk.txt")
grep -E "Requests/sec|50%|99%" "$W/wrk.txt"
HZ=$(getconf CLK_TCK)
echo "requests $REQS, errors $ERRS; chaperone CPU per request: $(awk -v t=$((T1 - T0)) -v hz="$HZ" -v n="$REQS" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}') µs"
[ "$ERRS" = 0 ] || { echo "FAILED: $ERRS responses were errors" >&2; exit 1; }
if [ "$PERF" = 1 ]; then
  echo
  echo "top symbols by self time (perf record -e cpu-clock; the profiler slows the run):"
  [ -n "${KEEP_PERF:-}" ] && cp "$W/perf.data" "$KEEP_PERF"
  perf report -i "$W/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | sed -E 's/ +- +- *$//; s/ +$//' | cut -c1-150 | head -45
fi
if [ "$STRACE" = 1 ]; then
  echo
  echo "syscalls per request (strace -c -f; strace slows the run, so only the counts matter):"
  awk -v n="$REQS" 'NR > 2 && $4 ~ /^[0-9]+$/ {printf "  %-16s %.2f\n", $NF, $4 / n}' "$W/strace.txt" | head -12
fi
