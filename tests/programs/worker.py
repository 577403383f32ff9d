#!/usr/bin/env python3
"""A test worker: one item per run, behaviour chosen by flags. Knows nothing of kiabatch."""

import argparse
import fcntl
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("item")
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--log", help="append 'start ITEM' / 'end ITEM' lines with timestamps")
parser.add_argument("--fail-times", type=int, default=0, help="fail this many attempts per item first")
parser.add_argument("--state", help="directory counting attempts per item")
parser.add_argument("--pid-dir", help="write PID to DIR/ITEM.pid while running")
parser.add_argument("--exit", type=int, default=None, help="exit with this code when item == --poison")
parser.add_argument("--poison", default=None)
args = parser.parse_args()


def log(event: str) -> None:
    if args.log:
        with open(args.log, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(f"{time.time():.6f} {event} {args.item} {os.environ.get('JOB_COMPLETION_INDEX')}\n")


log("start")
if args.pid_dir:
    with open(os.path.join(args.pid_dir, f"{args.item}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
if args.state:
    path = os.path.join(args.state, args.item)
    attempts = 1
    if os.path.exists(path):
        with open(path) as handle:
            attempts = int(handle.read()) + 1
    with open(path, "w") as handle:
        handle.write(str(attempts))
    if attempts <= args.fail_times:
        print(f"attempt {attempts} of {args.item} fails on purpose", file=sys.stderr)
        sys.exit(1)
time.sleep(args.sleep)
if args.poison is not None and args.item == args.poison:
    print(f"poison item {args.item}", file=sys.stderr)
    sys.exit(args.exit if args.exit is not None else 1)
print(f"done {args.item}")
log("end")
