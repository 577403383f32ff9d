#!/bin/sh
# kiabatch task runner: runs the worker once per claimed item of this task.
#
# The claim step wrote, for item N, items/N/argv/* (one file per argument) and
# optionally items/N/stdin. Item content is only ever read from those files into
# "$@" with quoted expansion: it is never parsed as shell text.
#
# Writes items/N/{started,stdout,stderr,exit_code} (in a pod, stderr is also copied
# live to the container log when the image has tee), then "done" holding the task's
# exit status (0, or the first failing item's code). With KIABATCH_AWAIT_REPORT=1
# (the Kubernetes pod) it then waits until the kiabatch sidecar has written
# "reported", so the pod only succeeds once the outcome is safely in Redis.
set -u
dir=${KIABATCH_TASK_DIR:-${0%/*}}
if [ -f "$dir/abandoned" ]; then
  # The sidecar could not claim this task (the batch is gone, or Redis stayed away):
  # fail the pod, so the Job retries the index within its retry limit.
  echo "kiabatch: $(cat "$dir/abandoned"); failing so the index is retried" >&2
  exit 75
fi
status=0
live=
if [ "${KIABATCH_AWAIT_REPORT:-0}" = 1 ] && command -v tee >/dev/null 2>&1; then live=1; fi
for item in "$dir"/items/*; do
  [ -d "$item" ] || continue
  [ -f "$item/invalid" ] && continue  # the reporter fails it with the reason given
  set --
  for file in "$item"/argv/*; do
    [ -f "$file" ] || continue
    value=$(cat "$file"; printf x)
    set -- "$@" "${value%x}"
  done
  input=/dev/null
  [ -f "$item/stdin" ] && input="$item/stdin"
  : >"$item/started"
  if [ -n "$live" ]; then
    # stderr goes to a file for the reporter and, live, to this container's log.
    ( "$@" <"$input" 2>&1 >"$item/stdout"; printf '%s\n' "$?" >"$item/exit_code" ) | tee "$item/stderr" >&2
  else
    "$@" <"$input" >"$item/stdout" 2>"$item/stderr"
    printf '%s\n' "$?" >"$item/exit_code"
  fi
  read -r code <"$item/exit_code"
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
done
# Readers treat a file without a complete line as "not yet", so no rename is needed.
printf '%s\n' "$status" >"$dir/done"
if [ "${KIABATCH_AWAIT_REPORT:-0}" = 1 ]; then
  limit=${KIABATCH_REPORT_TIMEOUT:-600}
  # Look every 20 ms where the image's sleep takes fractions (GNU, BusyBox), else every second:
  # the sidecar reports within milliseconds, and the pod ends as soon as this loop does.
  nap=0.02
  ticks=$((limit * 50))
  if ! sleep "$nap" 2>/dev/null; then nap=1; ticks=$limit; fi
  while [ ! -f "$dir/reported" ]; do
    if [ "$ticks" -le 0 ]; then
      echo "kiabatch: the reporter did not confirm within ${limit}s; failing so the index is retried" >&2
      exit 75
    fi
    sleep "$nap"
    ticks=$((ticks - 1))
  done
fi
exit "$status"
