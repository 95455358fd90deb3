#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv in the checkout (if missing or stale),
# then runs what you asked for.
#   ./dev.sh quickstart   synthetic data -> sweep -> fine-tune -> evaluate -> promote
#   ./dev.sh test         the test suite
#   ./dev.sh bench        the benchmarks (tables + JSON in tests/benchmarks/results/)
#   ./dev.sh shell        a shell with the environment active
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1

apt_install() {
  # The tests start sshd and PostgreSQL themselves, inside namespaces: the packages' own services
  # must not start (a policy-rc.d answering 101 says so, for the install only).
  local policy=/usr/sbin/policy-rc.d made=""
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made=1; fi
  apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
  local code=$?
  [ -n "$made" ] && rm -f "$policy"
  return $code
}

setup() {
  if [ "${1:-}" = test ]; then  # Debian packages the tests drive: Chromium (UI); sshd, rsync, ip, PostgreSQL (cluster)
    local missing=""
    [ -x /usr/bin/chromium ] || missing="$missing chromium"
    [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
    [ -x /usr/bin/rsync ] || missing="$missing rsync"
    [ -x /usr/sbin/ip ] || [ -x /usr/bin/ip ] || missing="$missing iproute2"
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
    if [ -n "$missing" ]; then
      echo "setup: installing Debian's$missing for the tests" >&2
      apt_install $missing || sudo bash -c "$(declare -f apt_install); apt_install $missing"
    fi
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
  fi
  local stamp=.venv/.installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing skinclr and its pinned dependencies into .venv (first time: a few minutes)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[tune,dev,ui,server]'
    touch "$stamp"
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  quickstart) setup; exec .venv/bin/skinclr quickstart "$@" ;;
  test)       setup test; exec .venv/bin/python -m pytest "$@" ;;
  bench)      setup; for b in tests/benchmarks/bench_*.py; do .venv/bin/python "$b" "$@"; done ;;
  shell)      setup; exec bash --rcfile <(echo 'source .venv/bin/activate') ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
