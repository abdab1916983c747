#!/usr/bin/env bash
# Start to ready: the time from exec to the first 200 from /readyz, with a 100-policy file
# and 50 routes (issue 21's floor: <= 50 ms), the median of RUNS starts. Also the idle RSS
# once ready (VmRSS, and how much of it is the binary's own pages).
#
# Usage: bash benches/startup.sh [RUNS]   (default 20). Not part of CI.
#        CHAPERONE_BIN=/path/to/chaperone bash benches/startup.sh [RUNS]   (that binary, unbuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
RUNS=${1:-20}
bench_binary
bench_workdir startup

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

# One resident prober starts the sidecar and polls /readyz every 0.5 ms over a socket of its
# own: a curl process per poll costs ~11 ms here and would compete for the two cores.
cat > "$W/probe.py" <<'PY'
import os, socket, subprocess, sys, time
binary, config, out = sys.argv[1], sys.argv[2], sys.argv[3]
env = dict(os.environ, BENCH_STATIC_KEY="v")
t0 = time.monotonic_ns()
proc = subprocess.Popen([binary, "run", "--config", config], env=env,
                        stdout=subprocess.DEVNULL, stderr=open(out + ".err", "w"))
while True:
    if proc.poll() is not None:
        sys.exit("chaperone exited before ready: " + open(out + ".err").read())
    try:
        with socket.create_connection(("127.0.0.1", 18711), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
            if s.recv(64).split(b" ")[1:2] == [b"200"]:
                break
    except OSError:
        pass
    time.sleep(0.0005)
t1 = time.monotonic_ns()
status = open(f"/proc/{proc.pid}/status").read()
field = lambda k: next(l.split()[1] for l in status.splitlines() if l.startswith(k))
print((t1 - t0) // 1000, field("VmRSS:"), field("RssFile:"))
proc.terminate()
proc.wait()
PY
times=()
for _ in $(seq 1 "$RUNS"); do
  read -r us rss file < <(python3 "$W/probe.py" "$BIN" "$W/chaperone.yaml" "$W/out")
  times+=("$us")
done
printf '%s\n' "${times[@]}" | sort -n | awk -v rss="$rss" -v file="$file" '
  { t[NR] = $1 }
  END {
    printf "start to ready, %d starts (100 policies, 50 routes): median %.1f ms, min %.1f ms, max %.1f ms\n", NR, t[int((NR + 1) / 2)] / 1000, t[1] / 1000, t[NR] / 1000
    printf "idle RSS when ready: %.1f MiB (%.1f MiB of it file-backed: the binary'"'"'s own pages)\n", rss / 1024, file / 1024
  }'
