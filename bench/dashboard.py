#!/usr/bin/env python3
"""The dashboard's speed: with 1,000 batches in Redis, the batches page and /metrics answer in under 300 ms.

    python bench/dashboard.py [--quick] [--batches N] [--repeat N]

Starts a private redis-server (the embedded server's binary) and ``kiabatch dashboard``
as a real server process, fills Redis, then times HTTP requests from this process.
Each figure is one JSON line ``{"target", "value", "baseline", "ratio", "ok"}``: the
median time of the page (ms) against the median time of ``/healthz`` on the same
server (the floor of one HTTP round trip), measured in the same run. ``--quick`` uses
fewer requests and a smaller big batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kiabatch.model import BatchSpec, WorkerSpec  # noqa: E402
from kiabatch.store import ItemOutcome, Store  # noqa: E402
from tests.helpers import RedisProcess  # noqa: E402

TARGET_MS = 300.0


def emit(target: str, value: float, baseline: float, goal: float = TARGET_MS) -> None:
    print(json.dumps({"target": target, "value": round(value, 1), "baseline": round(baseline, 1),
                      "ratio": round(value / baseline, 1) if baseline else None, "ok": value < goal,
                      "unit": "ms", "goal": f"< {goal:g} ms"}), flush=True)  # fmt: skip


def fill(store: Store, batches: int, big_items: int, big_settled: int) -> str:
    """``batches`` small batches in every state, and one big batch partly settled; returns the big one's id."""
    now = time.time()
    ok = ItemOutcome(ok=True, exit_code=0, duration=0.05, result=b"result")
    bad = ItemOutcome(ok=False, exit_code=3, duration=0.1, stderr=b"boom", reason="exited with status 3")
    for number in range(batches):
        spec = BatchSpec(id=f"bench-{number:05d}", workload="exec", worker=WorkerSpec(command=["true"]), tasks=3,
                         parallelism=2, chunk=1, retries=0, total=3, created_at=now - batches + number, ttl=86400,
                         schedule="nightly" if number % 10 == 0 else "")  # fmt: skip
        store.create(spec, ["1", "2", "3"])
        settle = number % 4  # 0: queued, 1..2: running, 3: finished
        for index in range(3 if settle == 3 else settle):
            claim = store.claim(spec.id, index)
            outcome = bad if (number % 7 == 0 and index == 0) else ok
            store.report(spec.id, index, claim.attempt, claim.sha1, [outcome], claimed_items=claim.items)
    big = BatchSpec(id="bench-big", workload="exec", worker=WorkerSpec(command=["true"]), tasks=big_items,
                    parallelism=100, chunk=1, retries=0, total=big_items, created_at=now + 1, ttl=86400)  # fmt: skip
    store.create(big, (str(i) for i in range(big_items)))
    for index in range(big_settled):
        claim = store.claim(big.id, index)
        store.report(big.id, index, claim.attempt, claim.sha1, [ok], claimed_items=claim.items)
    return big.id


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
        assert response.status == 200, url
    return (time.perf_counter() - started) * 1000


def median_ms(url: str, repeat: int) -> float:
    """Median over ``repeat`` requests, each after the server's 0.5 s batch-index cache has expired (cold reads)."""
    timed_get(url)  # warm: templates compiled, connections open
    samples = []
    for _ in range(repeat):
        time.sleep(0.6)
        samples.append(timed_get(url))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/dashboard.py")
    parser.add_argument("--quick", action="store_true", help="fewer requests, a smaller big batch")
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    repeat = args.repeat or (5 if args.quick else 15)
    big_items, big_settled = (100_000, 25_000) if args.quick else (1_000_000, 25_000)
    with tempfile.TemporaryDirectory(prefix="kb-bench-dash-") as directory:
        redis_server = RedisProcess(Path(directory) / "redis").start("--appendfsync", "everysec")
        try:
            store = Store(redis_server.client())
            big = fill(store, args.batches, big_items, big_settled)
            env = {**os.environ, "KIABATCH_REDIS_URL": redis_server.url, "KIABATCH_HOME": str(Path(directory) / "h")}
            server = subprocess.Popen([sys.executable, "-m", "kiabatch", "dashboard", "--port", "0"], env=env,
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            try:
                url = server.stdout.readline().split()[2]  # type: ignore[union-attr]
                floor = median_ms(url + "healthz", repeat)
                label = f"{args.batches:,} batches"
                emit(f"batches page, {label}", median_ms(url, repeat), floor)
                emit(f"batches page filtered by state, {label}", median_ms(url + "?state=running", repeat), floor)
                emit(f"/metrics, {label}", median_ms(url + "metrics", repeat), floor)
                emit(f"batch page, {big_items:,} items ({big_settled:,} settled)", median_ms(url + f"batches/{big}",
                                                                                            repeat), floor)  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=30)
        finally:
            redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
