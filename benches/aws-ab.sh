#!/usr/bin/env bash
# A/B of the request path with a static key and with an `aws` credential (a SigV4 signature
# per request), one worker each, run alternately: serial wrk runs, each reporting p50 and the
# sidecar's CPU time per request (from /proc/PID/stat), every response checked.
#
# Usage: bash benches/aws-ab.sh [--install] [--duration SECONDS]   (default 3 s per run)
# Needs wrk and nginx (the upstream). Not part of CI; results go into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_args "wrk nginx-light" "$@"
[ "${DUR}" = 10 ] && DUR=3
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "wrk and nginx are needed: --install" >&2; exit 2; }
cargo build --release -q --bin chaperone
BIN=${CARGO_TARGET_DIR:-target}/release/chaperone
W=$(mktemp -d /tmp/chaperone-aws-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
UP=18400; STATIC=18401; AWS=18402; CREDS=18407

nginx_upstream "$W" "127.0.0.1:$UP"
nginx -c "$W/upstream.conf" -e "$W/upstream-error.log" & PIDS+=($!)
echo 'permit(principal, action, resource);' > "$W/policy.cedar"
container_credentials "$CREDS"; PIDS+=("$CREDS_PID")
export BENCH_STATIC_KEY=bench-static
config() { # port admin credential [extra route line]
  cat <<EOF
listen: 127.0.0.1:$1
admin: 127.0.0.1:$2
identity: { id: spiffe://bench.local/ns/ml/sa/inference, workload: bench, environment: bench }
credentials:
  static-key: { kind: static, from_env: BENCH_STATIC_KEY }
  aws-session: { kind: aws, region: us-east-1 }
routes:
  - name: upstream
    match: { host: 127.0.0.1, port: $UP }
    credential: $3
    ${4:-}
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose-$1.jsonl }
workers: 1
EOF
}
config $STATIC 18411 static-key > "$W/static.yaml"
config $AWS 18412 aws-session "sign: { service: bedrock, region: us-east-1 }" > "$W/aws.yaml"
"$BIN" run --config "$W/static.yaml" 2>"$W/static.err" & S=$!; PIDS+=($S)
"$BIN" run --config "$W/aws.yaml" 2>"$W/aws.err" & A=$!; PIDS+=($A)
for port in $STATIC $AWS; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done
cat > "$W/req.lua" <<EOF
wrk.method = "GET"
wrk.path = "http://127.0.0.1:$UP/v1/models"
wrk.headers["Host"] = "127.0.0.1:$UP"
wrk.headers["Authorization"] = "Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-"
wrk.headers["chaperone-purpose"] = "bench"
EOF
for port in $STATIC $AWS; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$port" "http://127.0.0.1:$UP/v1/models")
  [ "$code" = 200 ] || { echo "port $port answered $code" >&2; exit 1; }
done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
failed=0
echo "target p50 cpu_us_per_request errors ($DUR s serial runs, wrk -t1 -c1)"
for _ in 1 2 3 4 5; do
  for pair in "static $STATIC $S" "aws $AWS $A"; do
    set -- $pair
    c0=$(cpu "$3")
    out=$(wrk -t1 -c1 -d"${DUR}s" --latency -s "$W/req.lua" "http://127.0.0.1:$2")
    c1=$(cpu "$3")
    line=$(echo "$out" | awk -v name="$1" -v ticks=$((c1 - c0)) -v hz="$TICK" '
      /requests in/ {n=$1} /^ +50%/ {p=$2} /Non-2xx or 3xx/ {e+=$NF} /Socket errors/ {gsub(/,/, ""); e+=$4+$6+$8+$10}
      END {printf "%s %s %.1f %d\n", name, p, ticks * 1000000 / hz / n, e}')
    echo "$line"
    [ "$(echo "$line" | awk '{print $4}')" = 0 ] || failed=1
  done
done
[ $failed = 0 ] || { echo "FAILED: some responses were errors" >&2; exit 1; }
