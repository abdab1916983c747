#!/usr/bin/env bash
# What the egress lock costs: the same wrk load from the app's UID through Chaperone to an
# nginx upstream beyond the pod, in two network namespaces joined by veth (as
# tests/egress_lock.rs sets them up), with the lock's jump out of OUTPUT and in it,
# alternated (off, on, off, on) so drift shows.
#
# Usage: bash benches/egress-lock.sh [--install] [--duration SECONDS]
#   --install   apt-get install wrk nginx-light iptables iproute2 first (Debian packages)
# Needs root. Not part of CI; results go into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_args "wrk nginx-light iptables iproute2" "$@"
for tool in wrk nginx iptables-restore ip setpriv; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: bash benches/egress-lock.sh --install" >&2; exit 2; }
done

cargo build --release -q --bin chaperone
BIN=$(realpath "${CARGO_TARGET_DIR:-target}/release/chaperone")
W=$(mktemp -d /tmp/chaperone-egress.XXXXXX)
chmod 755 "$W"
POD=chp-bench-pod-$$
NET=chp-bench-net-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del "$POD" 2>/dev/null || true
  ip netns del "$NET" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

ip netns add "$POD"
ip netns add "$NET"
ip link add veth0 netns "$POD" type veth peer name veth0 netns "$NET"
ip -n "$POD" addr add 10.77.0.1/24 dev veth0
ip -n "$NET" addr add 10.77.0.2/24 dev veth0
for ns in "$POD" "$NET"; do
  ip -n "$ns" link set veth0 up
  ip -n "$ns" link set lo up
done

nginx_upstream "$W" 10.77.0.2:8080
ip netns exec "$NET" nginx -c "$W/upstream.conf" -e "$W/upstream-error.log" & PIDS+=($!)

cat > "$W/policy.cedar" <<'EOF'
@id("bench-permit")
permit(principal, action, resource);
EOF
cat > "$W/chaperone.yaml" <<EOF
listen: 127.0.0.1:18401
admin: 127.0.0.1:18400
identity:
  id: spiffe://bench.local/ns/ml/sa/app
  workload: app
  environment: bench
  callers: { uids: [10001] }
routes:
  - name: upstream
    match: { host: 10.77.0.2, port: 8080 }
    purpose_default: bench
policy:
  file: $W/policy.cedar
log:
  format: json
  output: $W/purpose.log
EOF
touch "$W/purpose.log" && chown 65532:65532 "$W/purpose.log"
ip netns exec "$POD" setpriv --reuid 65532 --regid 65532 --clear-groups \
  "$BIN" run --config "$W/chaperone.yaml" 2> "$W/chaperone.err" & PIDS+=($!)
for _ in $(seq 100); do
  grep -q "admin on" "$W/chaperone.err" 2>/dev/null && break
  sleep 0.1
done
grep -q "admin on" "$W/chaperone.err" || { cat "$W/chaperone.err" >&2; exit 1; }

cat > "$W/req.lua" <<'EOF'
wrk.method = "GET"
wrk.path = "http://10.77.0.2:8080/v1/models"
wrk.headers["Host"] = "10.77.0.2:8080"
wrk.headers["Accept"] = "application/json"
EOF
run_wrk() { # threads conns -> "rps p50_us p99_us"
  ip netns exec "$POD" setpriv --reuid 10001 --regid 10001 --clear-groups \
    wrk -t"$1" -c"$2" -d"${DUR}s" --latency -s "$W/req.lua" "http://127.0.0.1:18401" 2>/dev/null | awk '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v }
    /^ +50%/ { p50 = us($2) } /^ +99%/ { p99 = us($2) } /^Requests\/sec/ { rps = $2 }
    END { printf "%d %d %d", rps, p50, p99 }'
}
lock() { ip netns exec "$POD" "$BIN" egress-lock --proxy-uid 65532 --no-dns 2>/dev/null; }
unjump() { ip netns exec "$POD" iptables -D OUTPUT -j CHAPERONE_EGRESS; }

# The lock must hold for the numbers to mean anything: the app's own connection is refused.
lock
if ip netns exec "$POD" setpriv --reuid 10001 --regid 10001 --clear-groups \
    curl -s -m 2 -o /dev/null http://10.77.0.2:8080/; then
  echo "the lock did not refuse a direct connection" >&2; exit 1
fi
unjump

echo "duration ${DUR}s per run; serial = wrk -t1 -c1, concurrent = wrk -t2 -c64; $(nproc) cores"
printf '%-10s %12s %9s %9s %12s %9s %9s\n' lock "serial rps" "p50 us" "p99 us" "conc rps" "p50 us" "p99 us"
for state in off on off on; do
  if [ "$state" = on ]; then lock; else ip netns exec "$POD" iptables -C OUTPUT -j CHAPERONE_EGRESS 2>/dev/null && unjump; fi
  read -r s_rps s_p50 s_p99 <<< "$(run_wrk 1 1)"
  read -r c_rps c_p50 c_p99 <<< "$(run_wrk 2 64)"
  printf '%-10s %12s %9s %9s %12s %9s %9s\n' "$state" "$s_rps" "$s_p50" "$s_p99" "$c_rps" "$c_p50" "$c_p99"
done
