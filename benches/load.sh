#!/usr/bin/env bash
# Load comparison on loopback, one run, same machine: the same wrk load sent
#   direct to the upstream, through Chaperone (forward-proxy mode, whole pipeline on: strip,
#   policy, credential, purpose log to a file; with a static key, a per-call JWT, and an `aws`
#   credential that signs every request with SigV4, its session from a local container
#   credentials endpoint), and through haproxy, nginx and squid where
#   installed (each rewriting one header, as Chaperone injects one).
# Prints requests/s and p50/p99 side by side with ratios to direct, and Chaperone's idle RSS.
#
# Usage: bash benches/load.sh [--install] [--duration SECONDS]
#   --install   apt-get install wrk nginx-light haproxy squid first (Debian packages)
# Not part of CI (it takes minutes); results go into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_args "wrk nginx-light haproxy squid" "$@"
command -v wrk >/dev/null || { echo "wrk is needed: bash benches/load.sh --install" >&2; exit 2; }
command -v nginx >/dev/null || { echo "nginx is needed as the upstream: bash benches/load.sh --install" >&2; exit 2; }

cargo build --release -q --bin chaperone
BIN=${CARGO_TARGET_DIR:-target}/release/chaperone
W=$(mktemp -d /tmp/chaperone-load.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT

UP=18300; CH_STATIC=18301; CH_JWT=18302; HAP=18303; NGX=18304; SQD=18305; CH_AWS=18306; CREDS=18307

# Upstream: nginx answering a small JSON body from memory, one worker.
nginx_upstream "$W" "127.0.0.1:$UP"
nginx -c "$W/upstream.conf" -e "$W/upstream-error.log" & PIDS+=($!)

# Chaperone: one config with a static credential, one minting a JWT per call.
cat > "$W/policy.cedar" <<'EOF'
@id("bench-permit")
permit(principal, action, resource) when { context.purpose == "bench" && principal.environment == "bench" };
@id("no-export")
forbid(principal, action, resource) when { context.purpose == "export-data" };
EOF
chaperone_config() { # port admin credential
  cat <<EOF
listen: 127.0.0.1:$1
admin: 127.0.0.1:$2
identity: { id: spiffe://bench.local/ns/ml/sa/inference, workload: bench, environment: bench }
credentials:
  static-key: { kind: static, from_env: BENCH_STATIC_KEY }
  per-call: { kind: jwt, ttl: 60s }
  aws-session: { kind: aws, region: us-east-1 }
routes:
  - name: upstream
    match: { host: 127.0.0.1, port: $UP }
    credential: $3
    scopes: [model.invoke]
    ${4:-}
strip: { mode: strip }
policy: { file: $W/policy.cedar }
log: { format: json, output: $W/purpose-$1.jsonl }
EOF
}
chaperone_config $CH_STATIC 18311 static-key > "$W/ch-static.yaml"
chaperone_config $CH_JWT 18312 per-call > "$W/ch-jwt.yaml"
chaperone_config $CH_AWS 18313 aws-session "sign: { service: bedrock, region: us-east-1 }" > "$W/ch-aws.yaml"
export BENCH_STATIC_KEY=bench-static-secret-value
container_credentials "$CREDS"; PIDS+=("$CREDS_PID")
"$BIN" run --config "$W/ch-static.yaml" 2>"$W/ch-static.err" & CH_STATIC_PID=$!; PIDS+=($CH_STATIC_PID)
"$BIN" run --config "$W/ch-jwt.yaml" 2>"$W/ch-jwt.err" & PIDS+=($!)
"$BIN" run --config "$W/ch-aws.yaml" 2>"$W/ch-aws.err" & PIDS+=($!)

TARGETS="direct:$UP chaperone-static:$CH_STATIC chaperone-jwt:$CH_JWT chaperone-aws:$CH_AWS"
if command -v haproxy >/dev/null; then
  cat > "$W/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAP
  http-request set-header Authorization "Bearer injected-by-haproxy"
  default_backend be
backend be
  server up 127.0.0.1:$UP
EOF
  haproxy -f "$W/haproxy.cfg" -db >/dev/null 2>&1 & PIDS+=($!)
  TARGETS="$TARGETS haproxy:$HAP"
fi
if command -v nginx >/dev/null; then
  cat > "$W/nginx-proxy.conf" <<EOF
worker_processes 2;
daemon off;
pid $W/nginx-proxy.pid;
error_log $W/nginx-proxy-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer injected-by-nginx";
    }
  }
}
EOF
  nginx -c "$W/nginx-proxy.conf" -e "$W/nginx-proxy-error.log" & PIDS+=($!)
  TARGETS="$TARGETS nginx:$NGX"
fi
if command -v squid >/dev/null; then
  # request_header_add appends, so the app's Authorization is removed first: haproxy's
  # set-header and nginx's proxy_set_header replace it. With both sent, nginx answered 400.
  cat > "$W/squid.conf" <<EOF
http_port 127.0.0.1:$SQD
http_access allow all
cache deny all
access_log none
cache_log $W/squid-cache.log
pid_filename $W/squid.pid
coredump_dir $W
request_header_access Authorization deny all
request_header_add Authorization "Bearer injected-by-squid" all
EOF
  squid -f "$W/squid.conf" -N >/dev/null 2>&1 & PIDS+=($!)
  TARGETS="$TARGETS squid:$SQD"
fi

# Every target gets the same absolute-form request (as an app with HTTP_PROXY sends) carrying
# a hard-coded key and a purpose; Chaperone strips the key and injects its credential.
cat > "$W/req.lua" <<EOF
wrk.method = "GET"
wrk.path = "http://127.0.0.1:$UP/v1/models?stream=false"
wrk.headers["Host"] = "127.0.0.1:$UP"
wrk.headers["Authorization"] = "Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-"
wrk.headers["chaperone-purpose"] = "bench"
wrk.headers["Accept"] = "application/json"
EOF

for port in 18311 18312 18313 $(for t in $TARGETS; do echo "${t##*:}"; done); do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done
sleep 0.5
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
IDLE_RSS=$(rss_kib $CH_STATIC_PID)

# Sanity: each target answers 200 through its proxy.
for t in $TARGETS; do
  name=${t%%:*}; port=${t##*:}
  code=$(curl -s -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$port" -H 'chaperone-purpose: bench' "http://127.0.0.1:$UP/v1/models" || true)
  [ "$code" = 200 ] || { echo "$name answered $code; not measuring it" >&2; TARGETS=${TARGETS/$t/}; }
done

# Every response is checked: wrk counts non-2xx/3xx answers and socket errors, and a run with
# any is reported as failed, never as a speed.
run_wrk() { # port threads conns -> "rps p50_us p99_us errors"
  wrk -t"$2" -c"$3" -d"${DUR}s" --latency -s "$W/req.lua" "http://127.0.0.1:$1" 2>/dev/null | awk '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v+0 }
    /Requests\/sec/ { rps=$2 }
    /^ +50%/ { p50=us($2) }
    /^ +99%/ { p99=us($2) }
    /Non-2xx or 3xx responses/ { errors += $NF }
    /Socket errors/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
    END { printf "%s %s %s %d\n", rps, p50, p99, errors }'
}

echo "duration ${DUR}s per run; serial = wrk -t1 -c1, concurrent = wrk -t2 -c64; $(nproc) cores"
RESULTS="$W/results.txt"
: > "$RESULTS"
for t in $TARGETS; do
  name=${t%%:*}; port=${t##*:}
  s=$(run_wrk "$port" 1 1)
  c=$(run_wrk "$port" 2 64)
  echo "$name $s $c" | tee -a "$RESULTS" >&2
done
LOADED_RSS=$(rss_kib $CH_STATIC_PID)

python3 - "$RESULTS" "$IDLE_RSS" "$LOADED_RSS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
d = next(r for r in rows if r[0] == "direct")
d_s_rps, d_s_p50, d_s_p99, d_c_rps = float(d[1]), float(d[2]), float(d[3]), float(d[5])
print()
print("| target | serial req/s | serial p50 µs | added p50 µs | serial p99 µs | c64 req/s | c64 ratio to direct | c64 p50 µs | c64 p99 µs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
failed = []
for r in rows:
    name = r[0]; s_rps, s_p50, s_p99, s_err, c_rps, c_p50, c_p99, c_err = map(float, r[1:9])
    if s_err or c_err:
        failed.append(f"{name}: {int(s_err)} serial and {int(c_err)} concurrent responses were errors")
        print(f"| {name} | FAILED ({int(s_err)} errors) | | | | FAILED ({int(c_err)} errors) | | | |")
        continue
    print(f"| {name} | {s_rps:,.0f} | {s_p50:.0f} | {s_p50 - d_s_p50:+.0f} | {s_p99:.0f} | {c_rps:,.0f} | {c_rps / d_c_rps:.2f}x | {c_p50:.0f} | {c_p99:.0f} |")
print()
print(f"Chaperone RSS: idle {int(sys.argv[2]) / 1024:.1f} MiB, after the load {int(sys.argv[3]) / 1024:.1f} MiB")
print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
for f in failed:
    print("FAILED:", f)
sys.exit(1 if failed else 0)
PY
