#!/usr/bin/env python3
"""kiabatch benchmarks: one JSON line per figure, each a ratio against a baseline run here.

    pip install -e '.[bench]'          # adds RQ, the enqueue baseline
    apt-get install redis-tools        # redis-benchmark, the pipelined LPUSH baseline
    python bench/bench.py [--quick] [--only enqueue|local|pi]

Every measurement runs ``--repeat`` times (baseline and kiabatch alternating) and the
medians are compared, since a shared 2-core machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def emit(figure: str, **values: object) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def medians(repeat: int, **actions: Callable[[], object]) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            samples[name].append(timed(action))
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_enqueue(count: int, repeat: int, rq_sample: int) -> None:
    from kiabatch import Queue
    from kiabatch.connection import connect

    client = connect()
    socket_path = client.connection_pool.connection_kwargs["path"]
    queue = Queue("bench-enqueue", client)

    def ours() -> None:
        queue.purge()
        queue.enqueue_many(range(count))

    def lpush() -> None:
        client.delete("bench:lpush")
        subprocess.run(["redis-benchmark", "-s", socket_path, "-t", "lpush", "-P", "100", "-n", str(count),
                        "-q", "--csv"], check=True, capture_output=True)  # fmt: skip

    actions: dict[str, Callable[[], object]] = {"kiabatch": ours}
    if shutil.which("redis-benchmark"):
        actions["redis-benchmark"] = lpush
    result = medians(repeat, **actions)
    rate = count / result["kiabatch"]
    emit("enqueue_many items/s", items=count, seconds=round(result["kiabatch"], 3), items_per_second=round(rate),
         goal=">= 100000", ok=rate >= 100_000)  # fmt: skip
    if "redis-benchmark" in result:
        ratio = result["kiabatch"] / result["redis-benchmark"]
        emit("enqueue_many vs redis-benchmark -t lpush -P 100", ratio=round(ratio, 2),
             kiabatch_seconds=round(result["kiabatch"], 3), baseline_seconds=round(result["redis-benchmark"], 3),
             goal="<= 3.0", ok=ratio <= 3.0)  # fmt: skip
    else:
        emit(
            "enqueue_many vs redis-benchmark",
            skipped="redis-benchmark not installed (apt-get install redis-tools)",
        )
    try:
        import rq
    except ImportError:
        emit("enqueue_many vs RQ", skipped="rq not installed (pip install -e '.[bench]')")
    else:
        rq_queue = rq.Queue("bench-rq", connection=client)
        rq_seconds = timed(lambda: [rq_queue.enqueue("bench.noop", i) for i in range(rq_sample)])
        rq_rate = rq_sample / rq_seconds
        rq_queue.empty()
        ratio = rate / rq_rate
        emit("enqueue_many vs RQ enqueue one at a time (rate ratio)", ratio=round(ratio, 1),
             kiabatch_items_per_second=round(rate), rq_items_per_second=round(rq_rate), rq_sample=rq_sample,
             goal=">= 20", ok=ratio >= 20)  # fmt: skip
    queue.purge()
    client.delete("bench:lpush")


def bench_local(tasks: int, repeat: int) -> None:
    from kiabatch import submit

    def xargs() -> None:
        subprocess.run(f"seq {tasks} | xargs -P 2 -n 1 true", shell=True, check=True)

    def ours() -> None:
        batch = submit(items=list(range(tasks)), command=["true"], parallel=2, wait=True)
        assert batch.status().progress.done == tasks
        batch.delete()

    result = medians(repeat, xargs=xargs, kiabatch=ours)
    ratio = result["kiabatch"] / result["xargs"]
    emit(f"local backend: {tasks} tasks of true at parallel 2 vs xargs -P 2", ratio=round(ratio, 2),
         kiabatch_seconds=round(result["kiabatch"], 3), baseline_seconds=round(result["xargs"], 3),
         goal="<= 3.0", ok=ratio <= 3.0)  # fmt: skip


def bench_pi(digits: int, repeat: int) -> None:
    single = [sys.executable, str(REPO / "workers" / "pi"), "--digits", str(digits)]
    ours = [
        sys.executable,
        "-m",
        "kiabatch",
        "submit",
        "pi",
        "-q",
        "--digits",
        str(digits),
        "--parallel",
        "2",
    ]
    outputs: dict[str, str] = {}

    def run(name: str, command: list[str]) -> Callable[[], None]:
        def action() -> None:
            outputs[name] = subprocess.run(command, check=True, capture_output=True, text=True).stdout

        return action

    result = medians(repeat, mpmath=run("mpmath", single), kiabatch=run("kiabatch", ours))
    assert outputs["mpmath"] == outputs["kiabatch"], "the digits differ"
    ratio = result["kiabatch"] / result["mpmath"]
    emit(f"pi {digits:,} digits, 2 tasks vs single-process mpmath", ratio=round(ratio, 2),
         kiabatch_seconds=round(result["kiabatch"], 2), baseline_seconds=round(result["mpmath"], 2),
         goal="<= 0.7" if digits >= 10**7 else "reported", ok=ratio <= 0.7 if digits >= 10**7 else None)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repetition (a smoke run)")
    parser.add_argument("--only", choices=["enqueue", "local", "pi"], action="append")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    chosen = set(args.only or ["enqueue", "local", "pi"])
    home = tempfile.mkdtemp(prefix="kiabatch-bench-")
    os.environ["KIABATCH_HOME"] = home  # a fresh embedded Redis, stopped at the end
    os.environ.pop("KIABATCH_REDIS_URL", None)
    sys.path.insert(0, str(Path(__file__).parent))  # RQ resolves "bench.noop" from here
    try:
        if "enqueue" in chosen:
            bench_enqueue(100_000 if args.quick else 1_000_000, repeat, 2_000 if args.quick else 20_000)
        if "local" in chosen:
            bench_local(200 if args.quick else 1000, repeat)
        if "pi" in chosen:
            for digits in [10**5] if args.quick else [10**6, 10**7]:
                bench_pi(digits, repeat)
    finally:
        from kiabatch import embedded

        embedded.stop(Path(home))
        shutil.rmtree(home, ignore_errors=True)
    return 0


def noop(item: object) -> object:
    """The job function RQ enqueues (never run: only enqueueing is measured)."""
    return item


if __name__ == "__main__":
    sys.exit(main())
