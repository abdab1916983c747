#!/usr/bin/env bash
# Start to ready: the time from exec to the first 200 from /readyz, with a 100-policy file
# and 50 routes (issue 21's floor: <= 50 ms), the median of RUNS starts. Also the idle RSS
# once ready (VmRSS, and how much of it is the binary's own pages).
#
# Usage: bash benches/startup.sh [RUNS]   (default 20). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-20}
cargo build --release -q --bin chaperone
BIN=${CARGO_TARGET_DIR:-target}/release/chaperone
W=$(mktemp -d /tmp/chaperone-startup.XXXXXX)
trap 'rm -rf "$W"' EXIT

{
  echo "listen: 127.0.0.1:18701"
  echo "admin: 127.0.0.1:18711"
  echo "identity: { id: spiffe://bench.local/ns/ml/sa/inference, workload: bench, environment: bench }"
  echo "credentials:"
  echo "  static-key: { kind: static, from_env: BENCH_STATIC_KEY }"
  echo "  per-call: { kind: jwt, ttl: 60s }"
  echo "routes:"
  for i in $(seq 1 50); do
    echo "  - name: api-$i"
    echo "    match: { host: api-$i.example.org, path_prefix: /v$((i % 3 + 1))/ }"
    echo "    credential: $([ $((i % 2)) = 0 ] && echo static-key || echo per-call)"
    echo "    labels: { team: team-$((i % 5)), sensitivity: $([ $((i % 4)) = 0 ] && echo high || echo low) }"
  done
  echo "strip: { mode: strip }"
  echo "policy: { file: $W/policy.cedar }"
  echo "log: { format: json, output: $W/purpose.jsonl }"
} > "$W/chaperone.yaml"
{
  for i in $(seq 1 100); do
    host=$((i % 50 + 1))
    echo "@id(\"p-$i\")"
    if [ $((i % 10)) = 0 ]; then
      echo "forbid (principal, action, resource == Destination::\"api-$host.example.org\") when { context.purpose == \"export-$i\" };"
    else
      echo "permit (principal, action == Action::\"POST\", resource == Destination::\"api-$host.example.org\") when { context.purpose like \"task-$i*\" && resource.labels has team && resource.labels.team == \"team-$((host % 5))\" };"
    fi
  done
} > "$W/policy.cedar"
BENCH_STATIC_KEY=v "$BIN" check --config "$W/chaperone.yaml" >/dev/null

times=()
for _ in $(seq 1 "$RUNS"); do
  t0=$(date +%s%N)
  BENCH_STATIC_KEY=v "$BIN" run --config "$W/chaperone.yaml" 2>"$W/err" &
  pid=$!
  until curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18711/readyz 2>/dev/null | grep -q 200; do
    kill -0 $pid 2>/dev/null || { cat "$W/err" >&2; exit 1; }
    sleep 0.001
  done
  t1=$(date +%s%N)
  times+=($(( (t1 - t0) / 1000 )))
  rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  file=$(awk '/RssFile/ {print $2}' /proc/$pid/status)
  kill $pid; wait $pid 2>/dev/null || true
done
printf '%s\n' "${times[@]}" | sort -n | awk -v rss="$rss" -v file="$file" '
  { t[NR] = $1 }
  END {
    printf "start to ready, %d starts (100 policies, 50 routes): median %.1f ms, min %.1f ms, max %.1f ms\n", NR, t[int((NR + 1) / 2)] / 1000, t[1] / 1000, t[NR] / 1000
    printf "idle RSS when ready: %.1f MiB (%.1f MiB of it file-backed: the binary'"'"'s own pages)\n", rss / 1024, file / 1024
  }'
