#!/bin/sh
# kiabatch-redis backups, kept as files on the backup volume.
#
#   backup.sh take          snapshot the primary (redis-cli --rdb) into
#                           kiabatch-redis-<UTC time>.rdb, verify it with
#                           redis-check-rdb, then keep only the newest $KIABATCH_BACKUP_KEEP
#   backup.sh verify FILE   check one snapshot with redis-check-rdb
#   backup.sh list          one line per snapshot, oldest first: NAME<TAB>BYTES
#
# Environment: KIABATCH_BACKUP_DIR (the backup volume), KIABATCH_BACKUP_KEEP,
# KIABATCH_REDIS_PRIMARY_ADDRESS (host:port), REDISCLI_AUTH (the password).
set -eu
export LC_ALL=C # glob order = byte order = time order for our names
me=kiabatch-redis-backup
log() { printf '%s: %s\n' "$me" "$*"; }
fail() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

dir=${KIABATCH_BACKUP_DIR:-/backups}
prefix=kiabatch-redis-

verify() {
  file=$1
  [ -f "$file" ] || fail "no snapshot $file"
  if report=$(redis-check-rdb "$file" 2>&1); then
    keys=$(printf '%s\n' "$report" | sed -n 's/^\[info\] \([0-9]*\) keys read$/\1/p')
    log "verified ${file##*/}: redis-check-rdb accepts it (${keys:-?} keys)"
    return 0
  fi
  reason=$(printf '%s\n' "$report" | grep -v '^\[info\]' | tail -n 3 | tr '\n' ' ')
  printf '%s: error: %s is corrupt: redis-check-rdb rejected it: %s\n' "$me" "${file##*/}" "$reason" >&2
  return 1
}

list() {
  for file in "$dir/$prefix"*.rdb; do
    [ -f "$file" ] || continue
    printf '%s\t%s\n' "${file##*/}" "$(wc -c <"$file" | tr -d ' ')"
  done
}

prune() {
  keep=$1
  set -- "$dir/$prefix"*.rdb
  [ -f "$1" ] || return 0
  excess=$(($# - keep))
  while [ "$excess" -gt 0 ]; do
    rm -f -- "$1"
    log "removed ${1##*/} (keeping the newest $keep)"
    shift
    excess=$((excess - 1))
  done
}

take() {
  keep=${KIABATCH_BACKUP_KEEP:-7}
  case $keep in '' | *[!0-9]* | 0) fail "KIABATCH_BACKUP_KEEP must be a whole number >= 1, not '$keep'" ;; esac
  primary=${KIABATCH_REDIS_PRIMARY_ADDRESS:-kiabatch-redis-primary:6379}
  host=${primary%:*}
  port=${primary##*:}
  if [ ! -d "$dir" ] || [ ! -w "$dir" ]; then fail "the backup directory $dir is missing or not writable"; fi
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  name=$prefix$stamp.rdb
  [ -e "$dir/$name" ] && fail "$name already exists (two backups in one second?)"
  partial=$dir/.partial-$stamp.rdb
  trap 'rm -f -- "$partial"' EXIT
  log "taking a snapshot of the primary $host:$port"
  if ! output=$(redis-cli --no-auth-warning -h "$host" -p "$port" --rdb "$partial" 2>&1); then
    fail "cannot take a snapshot from $host:$port: $(printf '%s\n' "$output" | tail -n 2 | tr '\n' ' ')"
  fi
  verify "$partial" || fail "the snapshot taken from $host:$port failed verification; not kept"
  mv -- "$partial" "$dir/$name"
  trap - EXIT
  log "stored $name ($(wc -c <"$dir/$name" | tr -d ' ') bytes)"
  prune "$keep"
}

case ${1:-} in
  take) take ;;
  verify)
    [ $# -eq 2 ] || fail "usage: backup.sh verify FILE"
    verify "$2"
    ;;
  list) list ;;
  *) fail "usage: backup.sh take | verify FILE | list" ;;
esac
