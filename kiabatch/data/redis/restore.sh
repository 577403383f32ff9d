#!/bin/sh
# kiabatch-redis restore: install one snapshot as the primary's data.
#
#   restore.sh SNAPSHOT     (a name from "backup.sh list")
#
# Runs in a Job while the StatefulSet is down, with the backup volume and pod 0's
# data volume mounted. The snapshot is verified, then loaded by a private
# redis-server (unix socket only) in a scratch directory on the data volume,
# which writes the append-only files kiabatch-redis starts from. Only then is the
# old data moved aside into pre-restore-<UTC time>/ and the new files put in
# place, so a failure at any step leaves the data volume as it was.
#
# Environment: KIABATCH_BACKUP_DIR, KIABATCH_REDIS_DATA (pod 0's data volume),
# KIABATCH_REDIS_CONFIG (the ConfigMap), KIABATCH_REDIS_RUN (a scratch emptyDir
# for the socket), KIABATCH_RESTORE_WAIT_SECONDS (how long loading may take).
set -eu
export LC_ALL=C
me=kiabatch-redis-restore
log() { printf '%s: %s\n' "$me" "$*"; }
fail() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

[ $# -eq 1 ] || fail "usage: restore.sh SNAPSHOT"
snapshot=$1
case $snapshot in
  kiabatch-redis-[0-9]*Z.rdb) ;;
  *) fail "'$snapshot' is not a snapshot name (kiabatch-redis-YYYYMMDDTHHMMSSZ.rdb)" ;;
esac
case $snapshot in */* | *[!A-Za-z0-9.-]*) fail "'$snapshot' is not a snapshot name" ;; esac
here=$(dirname "$0")
backups=${KIABATCH_BACKUP_DIR:-/backups}
data=${KIABATCH_REDIS_DATA:-/data}
config=${KIABATCH_REDIS_CONFIG:-/etc/kiabatch-redis}
run=${KIABATCH_REDIS_RUN:-/run/kiabatch-redis}
wait_seconds=${KIABATCH_RESTORE_WAIT_SECONDS:-3600}
[ -f "$backups/$snapshot" ] || fail "no snapshot $snapshot in the backup volume (see: kiabatch redis backups)"
if [ ! -d "$data" ] || [ ! -w "$data" ]; then fail "the data volume $data is missing or not writable"; fi

KIABATCH_BACKUP_DIR=$backups sh "$here/backup.sh" verify "$backups/$snapshot" ||
  fail "not restoring $snapshot: it failed verification; the data volume is unchanged"

scratch=$data/.kiabatch-restore
socket=$run/restore.sock
rm -rf -- "$scratch"
mkdir -p -- "$scratch"
cp -- "$backups/$snapshot" "$scratch/dump.rdb"
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf -- "$scratch"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# The ConfigMap's redis.conf gives the same AOF names and format as kiabatch-redis.
redis-server "$config/redis.conf" --port 0 --unixsocket "$socket" --dir "$scratch" \
  --appendonly no --save '' --maxmemory 0 --logfile "$scratch/redis.log" &
server=$!
cli() { redis-cli -s "$socket" "$@"; }

waited=0
until [ "$(cli ping 2>/dev/null)" = PONG ]; do
  if ! kill -0 "$server" 2>/dev/null; then
    tail -n 5 "$scratch/redis.log" >&2 || true
    server=
    fail "redis-server could not load $snapshot; the data volume is unchanged"
  fi
  [ "$waited" -lt "$wait_seconds" ] || fail "loading $snapshot took more than ${wait_seconds}s"
  sleep 1
  waited=$((waited + 1))
done
keys=$(cli info keyspace | tr -d '\r' | awk -F'[:=,]' '/^db[0-9]+:/ { n += $3 } END { print n + 0 }')
log "loaded $snapshot: $keys keys"
info() { cli info persistence | tr -d '\r' | sed -n "s/^$1://p"; }
cli config set appendonly yes >/dev/null
waited=0
until [ "$(info aof_enabled)" = 1 ] && [ "$(info aof_rewrite_in_progress)" = 0 ] &&
  [ "$(info aof_rewrite_scheduled)" = 0 ]; do
  [ "$waited" -lt "$wait_seconds" ] || fail "writing the append-only file took more than ${wait_seconds}s"
  sleep 1
  waited=$((waited + 1))
done
[ "$(info aof_last_bgrewrite_status)" = ok ] || fail "writing the append-only file failed (see $scratch/redis.log)"
cli shutdown >/dev/null 2>&1 || true
wait "$server" || true
server=
[ -d "$scratch/appendonlydir" ] || fail "redis-server wrote no append-only files"

# Swap: the old data goes aside (a rename on the same volume), the new one in.
aside=$data/pre-restore-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -- "$aside"
for old in appendonlydir dump.rdb; do
  if [ -e "$data/$old" ]; then mv -- "$data/$old" "$aside/"; fi
done
mv -- "$scratch/appendonlydir" "$data/appendonlydir"
log "restored $snapshot into $data ($keys keys); the previous data is in ${aside##*/}"
