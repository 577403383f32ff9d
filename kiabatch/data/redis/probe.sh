#!/bin/sh
# kiabatch-redis probes: "ready" needs PONG; "live" also accepts LOADING, so a
# large dataset being loaded from the AOF is not killed half-way.
# The password comes from REDISCLI_AUTH (a Secret) in the container's environment.
set -eu
mode=${1:-ready}
port=${KIABATCH_REDIS_PORT:-6379}
answer=$(redis-cli --no-auth-warning -h 127.0.0.1 -p "$port" ping 2>&1) || true
case $mode:$answer in
  *:PONG) exit 0 ;;
  live:LOADING*) exit 0 ;;
esac
printf 'kiabatch-redis-probe: %s: redis-cli ping answered: %s\n' "$mode" "$answer" >&2
exit 1
