#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): Debian libb64 for perf_analyzer, nginx for the
# local fleet, kubectl if absent, a virtual environment in .venv with requirements.txt.
# Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  echo "usage: scripts/setup.sh   # create .venv and install requirements.txt (+ libb64-0d, nginx, kubectl)"
  exit 0
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  echo "setup: installing Debian libb64-0d (perf_analyzer needs it)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq libb64-0d >/dev/null \
    || echo "setup: warning: could not install libb64-0d; perf_analyzer benchmarks will not run" >&2
fi
# nginx: the local fleet's balancer (scripts/fleet.sh, tests/test_fleet.py). Debian starts its
# web server on port 80 where systemd runs: the fleet runs its own nginx, so that one is stopped.
if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
  echo "setup: installing Debian nginx (the local fleet's balancer)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  if $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq nginx >/dev/null; then
    if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
      $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
  else
    echo "setup: warning: could not install nginx; the fleet tests will fail" >&2
  fi
fi
# kubectl renders deploy/k8s/ offline (`kubectl kustomize`); Debian's kubernetes-client where absent.
if ! command -v kubectl >/dev/null; then
  echo "setup: installing Debian kubernetes-client (kubectl, for the manifest checks)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq kubernetes-client >/dev/null \
    || echo "setup: warning: could not install kubectl; the manifest tests will fail" >&2
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: installing requirements.txt into .venv (first time: a few minutes)"
  # (this machine's pip config lists local indexes that may be absent: drop those warnings)
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv, $(.venv/bin/python --version))"
