#!/usr/bin/env bash
# rolling-update.sh [--build] — replace the chatserver replicas one at a time, so that
# clients see no 502 and every one of them reconnects and resumes (nothing lost or
# repeated: they resume each room from the last id they hold).
#
# For each running replica (the old ones, listed at the start):
#   1. start one more: `docker compose up -d --no-deps --no-recreate --scale chatserver=N+1`
#      (the new container runs the current image and compose file);
#   2. wait until its /readyz answers 200 (Redis connected), from inside the container;
#   3. wait RESOLVER_WAIT seconds, longer than nginx.conf's `resolver ... valid=5s`, so
#      every nginx worker routes to the new address;
#   4. `docker stop` the old one: SIGTERM, its /readyz turns 503, its listener closes
#      (nginx tries another address), its clients get 1001 and reconnect through nginx
#      to the others; it exits within CHAT_GRACE (stop_grace_period is longer);
#   5. `docker rm` it (Docker's DNS forgot it when it stopped).
# The replica count is the same at the end; `docker compose up -d` afterwards changes
# nothing. --build first builds the image from the checkout.
#
# Env: COMPOSE (default `docker compose`, e.g. `docker compose -p x -f a.yml -f b.yml`),
# SERVICE (chatserver), RESOLVER_WAIT (6), READY_TIMEOUT (60), STOP_TIMEOUT (20).
set -euo pipefail
cd "$(dirname "$0")/.."

read -ra COMPOSE <<<"${COMPOSE:-docker compose}"
SERVICE=${SERVICE:-chatserver}
RESOLVER_WAIT=${RESOLVER_WAIT:-6}
READY_TIMEOUT=${READY_TIMEOUT:-60}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
READY_PROBE="import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '3020'), timeout=2)"

log() { printf '[rolling-update %s] %s\n' "$(date +%T)" "$*"; }
running() { "${COMPOSE[@]}" ps -q "$SERVICE" | sort; }

if [ "${1:-}" = --build ]; then
  log "building $SERVICE"
  "${COMPOSE[@]}" build "$SERVICE"
fi

mapfile -t old < <(running)
count=${#old[@]}
[ "$count" -gt 0 ] || { echo "rolling-update: no running $SERVICE container (docker compose up -d first)" >&2; exit 1; }
log "replacing $count $SERVICE replicas one at a time"
started=$(date +%s)

for id in "${old[@]}"; do
  before=$(running)
  "${COMPOSE[@]}" up -d --no-deps --no-recreate --scale "$SERVICE=$((count + 1))" "$SERVICE"
  new=$(comm -13 <(echo "$before") <(running) | head -1)
  [ -n "$new" ] || { echo "rolling-update: no new $SERVICE container appeared" >&2; exit 1; }
  deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until docker exec "$new" python -c "$READY_PROBE" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "rolling-update: new replica ${new:0:12} not ready within ${READY_TIMEOUT}s; old ${id:0:12} left running" >&2
      docker logs --tail 20 "$new" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  log "new ${new:0:12} ready; waiting ${RESOLVER_WAIT}s for nginx to resolve it"
  sleep "$RESOLVER_WAIT"
  log "draining old ${id:0:12} (SIGTERM: 1001 to its clients)"
  docker stop -t "$STOP_TIMEOUT" "$id" >/dev/null
  docker rm "$id" >/dev/null
done
log "done: $count replicas replaced in $(( $(date +%s) - started ))s"
