#!/usr/bin/env bash
# The benchmark we are judged by (../shared/bench) with chatserver from this checkout's
# .venv. The per-connection rate limit is turned off (CHAT_RATE=0): the fan-out publisher
# sends far faster than a person; every other setting is the default.
# With no arguments: the run bench/README.md reports. Any arguments go to the harness.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${CHAT_BENCH_DIR:-$here/../shared/bench}"
cmd="project=env CHAT_RATE=0 $here/.venv/bin/chatserver --host 127.0.0.1 --port \$PORT --workers \$W"
if [ $# -eq 0 ]; then
  set -- --sut project:1 --sut seed-fastify --sut aiohttp-naive --sut limit-batch --sut project:2 \
         --scenarios fanout,connect,chat --repeat 3
fi
exec "$shared/run.sh" --cmd "$cmd" "$@"
