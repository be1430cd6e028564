#!/usr/bin/env bash
# Install the system packages the test suite drives for real: Debian's redis-server,
# nginx and chromium (and python3-venv when the .venv cannot be made). Used by `make test` and by .ci/run; does nothing when all three
# are present. Needs root and apt-get; otherwise it prints one line saying what to
# install and exits 1, so `make test` stops before 20 confusing errors.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
# redis-cli --cluster create builds the tests' Redis Cluster (Debian: redis-tools, which
# redis-server depends on; named in case only the server was installed some other way).
command -v redis-cli >/dev/null || [ -x /usr/bin/redis-cli ] || missing+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/bin/chromium ] || missing+=(chromium)  # tests/e2e/test_browser.py drives this path
# Debian splits venv's pip bootstrap out of python3; the Makefile's .venv needs it.
"${PY:-python3}" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  why="not root"; command -v apt-get >/dev/null || why="no apt-get"
  echo "install-test-deps: missing ${missing[*]} ($why): install them (Debian: sudo apt-get install ${missing[*]}), then run make test again" >&2
  exit 1
fi

echo "install-test-deps: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# apt may start the services it just installed (where an init system runs); the tests
# start their own on free ports, so stop these again.
for pkg in "${missing[@]}"; do
  case "$pkg" in
    nginx|redis-server) (service "$pkg" stop >/dev/null 2>&1 || true) ;;
  esac
done
