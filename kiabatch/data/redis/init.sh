#!/bin/sh
# kiabatch-redis init container: choose this pod's role from its ordinal.
#
# A StatefulSet pod's hostname is <statefulset>-<ordinal>. Pod 0 is the primary;
# pod N waits (bounded tries, one log line per try) until pod 0's stable DNS name
# resolves and answers PING with the password, then replicates it. The result is
# $KIABATCH_REDIS_RUN/role.conf, which holds no secret: start.sh passes
# requirepass and masterauth from the environment (a Secret) on standard input.
#
# Environment: HOSTNAME (the pod name), KIABATCH_REDIS_NAMESPACE,
# KIABATCH_REDIS_SERVICE (headless Service), KIABATCH_REDIS_CLUSTER_DOMAIN,
# KIABATCH_REDIS_PORT, KIABATCH_REDIS_WAIT_TRIES, KIABATCH_REDIS_WAIT_SECONDS,
# REDISCLI_AUTH (the password), and KIABATCH_REDIS_PRIMARY_ADDRESS (host:port)
# to override the primary's address.
set -eu
me=kiabatch-redis-init
log() { printf '%s: %s\n' "$me" "$*"; }
fail() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

# shellcheck disable=SC3028 # the container runtime sets HOSTNAME to the pod name
pod=${HOSTNAME:-$(cat /proc/sys/kernel/hostname)}
ordinal=${pod##*-}
case $ordinal in
  '' | *[!0-9]*) fail "cannot read a StatefulSet ordinal from the pod name '$pod'" ;;
esac
set_name=${pod%-*}
run=${KIABATCH_REDIS_RUN:-/run/kiabatch-redis}
port=${KIABATCH_REDIS_PORT:-6379}
role_file=$run/role.conf

write_role() {
  # Write then rename, so start.sh never reads half a file.
  cat >"$role_file.tmp"
  mv "$role_file.tmp" "$role_file"
}

if [ "$ordinal" -eq 0 ]; then
  printf '# role: primary (pod %s)\n' "$pod" | write_role
  log "pod $pod is the primary"
  exit 0
fi

namespace=${KIABATCH_REDIS_NAMESPACE:-default}
service=${KIABATCH_REDIS_SERVICE:-$set_name}
domain=${KIABATCH_REDIS_CLUSTER_DOMAIN:-cluster.local}
primary=${KIABATCH_REDIS_PRIMARY_ADDRESS:-$set_name-0.$service.$namespace.svc.$domain:$port}
host=${primary%:*}
primary_port=${primary##*:}
tries=${KIABATCH_REDIS_WAIT_TRIES:-60}
interval=${KIABATCH_REDIS_WAIT_SECONDS:-2}
case $host:$primary_port:$tries:$interval in
  :* | *::* | *[!A-Za-z0-9.:_-]*) fail "bad primary address '$primary' or wait settings" ;;
esac
case $primary_port$tries$interval in
  *[!0-9]*) fail "port, tries and seconds must be whole numbers" ;;
esac
[ -n "${REDISCLI_AUTH:-}" ] || fail "REDISCLI_AUTH (the Redis password, from the Secret) is not set"

# redis-cli has no connect timeout before Redis 7.2: bound every call with timeout(1).
bounded() {
  if command -v timeout >/dev/null 2>&1; then timeout 10 "$@"; else "$@"; fi
}

resolves() {
  command -v getent >/dev/null 2>&1 || return 0 # no getent: let redis-cli resolve it
  getent hosts "$host" >/dev/null 2>&1
}

try=1
while :; do
  if ! resolves; then
    state="does not resolve yet"
  else
    answer=$(bounded redis-cli --no-auth-warning -h "$host" -p "$primary_port" ping 2>&1) || true
    [ "$answer" = PONG ] && break
    answer=$(printf '%s' "$answer" | tr '\r\n' '  ')
    state="does not answer PING with the password (${answer:-no answer})"
  fi
  if [ "$try" -ge "$tries" ]; then
    fail "primary $host:$primary_port $state after $tries tries; giving up (is pod $set_name-0 running and ready?)"
  fi
  log "try $try/$tries: primary $host:$primary_port $state; retrying in ${interval}s"
  try=$((try + 1))
  sleep "$interval"
done

{
  printf '# role: replica of %s (pod %s); masterauth comes from start.sh\n' "$primary" "$pod"
  printf 'replicaof %s %s\n' "$host" "$primary_port"
} | write_role
log "pod $pod replicates the primary $host:$primary_port (answered PING on try $try)"
