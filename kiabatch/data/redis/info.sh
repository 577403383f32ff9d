#!/bin/sh
# kiabatch-redis status probe: INFO (replication, memory, persistence) of every pod.
#
# KIABATCH_REDIS_PODS lists the pods as host:port, separated by spaces, in
# ordinal order (their stable DNS names). For pod N this prints "### N host:port",
# then either the INFO text or "!!! " and why it could not be read; "### end"
# closes the output.
# The password comes from REDISCLI_AUTH (a Secret).
set -eu
pods=${KIABATCH_REDIS_PODS:?KIABATCH_REDIS_PODS is not set}
bounded() {
  if command -v timeout >/dev/null 2>&1; then timeout 10 "$@"; else "$@"; fi
}
# Word splitting on spaces is the list format; no globbing in host:port words.
set -f
ordinal=0
for address in $pods; do
  host=${address%:*}
  port=${address##*:}
  printf '### %s %s\n' "$ordinal" "$address"
  if output=$(bounded redis-cli --no-auth-warning -e -h "$host" -p "$port" info replication memory persistence 2>&1); then
    printf '%s\n' "$output" | tr -d '\r'
  else
    printf '!!! %s\n' "$(printf '%s' "${output:-no answer}" | tr '\r\n' '  ')"
  fi
  ordinal=$((ordinal + 1))
done
printf '### end\n'
