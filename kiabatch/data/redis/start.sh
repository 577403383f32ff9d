#!/bin/sh
# kiabatch-redis main container: start redis-server as this pod's role.
#
# Reads the ConfigMap's redis.conf, then (on standard input, so the password is
# never written to a file nor shown on a command line) the data directory
# ($KIABATCH_REDIS_DATA), the role.conf written by init.sh, and requirepass and
# masterauth from REDIS_PASSWORD (a Secret). Arguments are passed on to
# redis-server and override both.
set -eu
me=kiabatch-redis-start
fail() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

config=${KIABATCH_REDIS_CONFIG:-/etc/kiabatch-redis}
run=${KIABATCH_REDIS_RUN:-/run/kiabatch-redis}
data=${KIABATCH_REDIS_DATA:-/data}
role_file=$run/role.conf
[ -f "$role_file" ] || fail "$role_file is missing: the init container (init.sh) did not run"
password=${REDIS_PASSWORD:-}
[ -n "$password" ] || fail "REDIS_PASSWORD (from the Secret) is not set"
# The password goes into a config line: only characters that need no quoting.
case $password in
  *[!A-Za-z0-9._~+/=-]*) fail "the password may only contain letters, digits and . _ ~ + / = -" ;;
esac
case $role_file$data in
  *[!A-Za-z0-9._/-]*) fail "unusual characters in the paths $role_file or $data" ;;
esac
[ -d "$data" ] || fail "the data directory $data does not exist"

exec redis-server "$config/redis.conf" "$@" - <<CONF
dir $data
include $role_file
requirepass $password
masterauth $password
CONF
