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

setup() {
  if [ ! -x /usr/bin/chromium ] && [ "${1:-}" = test ]; then  # the UI test drives Debian's Chromium
    echo "setup: installing Debian's chromium for the browser test" >&2
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || sudo sh -c 'apt-get update -qq && apt-get install -y -qq chromium >/dev/null'
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
  fi
  local stamp=.venv/.installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing skinclr and its pinned dependencies into .venv (first time: a few minutes)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[tune,dev,ui]'
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
