# Shared by the load scripts (sourced): argument parsing and the nginx upstream.

# bench_args "PACKAGES" ARGS...: `--install` installs the Debian PACKAGES first;
# `--duration SECONDS` sets DUR (default 10).
bench_args() {
  local packages=$1
  shift
  DUR=10
  while [ $# -gt 0 ]; do
    case "$1" in
      --install)
        # shellcheck disable=SC2086 # a list of package names
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null ;;
      --duration) DUR=$2; shift ;;
      *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
  done
}

# nginx_upstream DIR LISTEN: DIR/upstream.conf, an nginx (one worker, no access log)
# answering a small JSON body from memory on LISTEN.
nginx_upstream() {
  cat > "$1/upstream.conf" <<EOF2
worker_processes 1;
daemon off;
pid $1/upstream.pid;
error_log $1/upstream-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen $2;
    location / { default_type application/json; return 200 '{"ok":true,"model":"bench"}'; }
  }
}
EOF2
}
