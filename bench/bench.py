#!/usr/bin/env python3
"""kiabatch benchmarks: one JSON line per target, each a ratio against a baseline measured in the same run.

    pip install -e '.[bench]'          # adds RQ, the enqueue baseline
    apt-get install redis-tools        # redis-benchmark, the pipelined LPUSH baseline
    python bench/bench.py [--quick] [--only NAME ...] [--repeat N]

Each line: {"target", "value", "baseline", "ratio", "goal", "ok", ...details}. Small
measurements run ``--repeat`` times, alternating kiabatch and its baseline, and compare
medians (a shared 2-core machine is noisy); the long ones run once. ``--quick`` runs
small sizes (under two minutes) as a smoke test: its ratios are indicative only.
"""

from __future__ import annotations

import argparse
import compileall
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KIABATCH = [sys.executable, "-m", "kiabatch"]
MIB = 1024 * 1024


def emit(target: str, *, value: float, baseline: float, goal: str, ok: bool | None, **details: Any) -> None:
    ratio = value / baseline if baseline else None
    print(json.dumps({"target": target, "value": round(value, 4), "baseline": round(baseline, 4),
                      "ratio": None if ratio is None else round(ratio, 3), "goal": goal, "ok": ok, **details}),
          flush=True)  # fmt: skip


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


def bests(repeat: int, **actions: Callable[[], object]) -> dict[str, float]:
    """The fastest of ``repeat`` alternating runs: for short process starts, where the noise only adds."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            samples[name].append(timed(action))
    return {name: min(values) for name, values in samples.items()}


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def peak_rss_mib(command: list[str], **kwargs: Any) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of ``command`` as a child process (its own high-water mark)."""
    probe = (
        "import resource, subprocess, sys, time\nstarted = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\ntook = time.perf_counter() - started\n"
        "print(took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(done.returncode)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True,
                          **kwargs)  # fmt: skip
    took, kib = done.stdout.split()
    return float(took), int(kib) / 1024


# -- synthetic batches: the exact Redis layout a finished batch has, written in bulk ------------------


def finished_batch(store: Any, batch_id: str, items: int, chunk: int = 1, result: bytes = b"ok\n") -> None:
    """A succeeded batch of ``items`` results, written directly in the store's layout (fast to make)."""
    from kiabatch import keys
    from kiabatch.model import BatchSpec, State, WorkerSpec

    k = keys.batch_keys(batch_id)
    tasks = -(-items // chunk)
    spec = BatchSpec(id=batch_id, workload="exec", worker=WorkerSpec(command=["echo", "{item}"]), tasks=tasks,
                     parallelism=2, chunk=chunk, retries=3, total=items, created_at=time.time(), ttl=0)  # fmt: skip
    outcome = json.dumps({"exit_code": 0, "duration": 0.001, "attempt": 1})
    redis = store.redis
    for start in range(0, tasks, 5000):
        with redis.pipeline(transaction=False) as pipe:
            indexes = range(start, min(tasks, start + 5000))
            claims, sizes, results, outcomes = {}, {}, {}, {}
            for index in indexes:
                values = list(range(index * chunk, min(items, (index + 1) * chunk)))
                claims[index] = json.dumps([f"item-{v}" for v in values])
                sizes[index] = len(values)
                for position in range(len(values)):
                    results[f"{index}:{position}"] = result
                    outcomes[f"{index}:{position}"] = outcome
            pipe.hset(k.claims, mapping=claims)
            pipe.hset(k.sizes, mapping=sizes)
            pipe.hset(k.results, mapping=results)
            pipe.hset(k.outcomes, mapping=outcomes)
            pipe.sadd(k.final, *indexes)
            pipe.execute()
    redis.hset(k.meta, mapping={**spec.to_fields(), "state": State.SUCCEEDED, "started_at": time.time(),
                                "finished_at": time.time()})  # fmt: skip
    redis.hset(k.progress, mapping={"total": items, "done": items, "failed": 0, "running": 0})
    redis.zadd(keys.BATCH_INDEX, {batch_id: time.time()})


# -- targets -------------------------------------------------------------------------------------


def bench_enqueue(count: int, repeat: int, rq_sample: int) -> None:
    from kiabatch import Queue
    from kiabatch.connection import connect

    client = connect()
    client.ping()
    connection = client.connection_pool.get_connection()
    socket_path = connection.path  # the embedded server's socket, for redis-benchmark
    client.connection_pool.release(connection)
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
    emit("enqueue_many items/s", value=rate, baseline=100_000, goal=">= 100000 items/s", ok=rate >= 100_000,
         items=count)  # fmt: skip
    if "redis-benchmark" in result:
        ratio = result["kiabatch"] / result["redis-benchmark"]
        emit("enqueue_many vs redis-benchmark -t lpush -P 100", value=result["kiabatch"],
             baseline=result["redis-benchmark"], goal="<= 3.0", ok=ratio <= 3.0, items=count)  # fmt: skip
    try:
        import rq
    except ImportError:
        print(json.dumps({"target": "enqueue_many vs RQ", "skipped": "pip install -e '.[bench]'"}), flush=True)
    else:
        rq_queue = rq.Queue("bench-rq", connection=client)
        rq_seconds = timed(lambda: [rq_queue.enqueue("bench.noop", i) for i in range(rq_sample)])
        rq_queue.empty()
        # A rate ratio: seconds per item of RQ over ours (>= 20: 20 times as fast).
        emit("enqueue_many vs RQ enqueue one at a time (speed-up)", value=rq_seconds / rq_sample,
             baseline=result["kiabatch"] / count, goal=">= 20", ok=rq_seconds / rq_sample * count / result["kiabatch"]
             >= 20, rq_sample=rq_sample)  # fmt: skip
    queue.purge()
    client.delete("bench:lpush")


def bench_task_steps(tasks: int, repeat: int) -> None:
    """Issue 10 target 1: claim + report of a 1-item task as processes vs `python -c "import redis"` as often."""
    from kiabatch import submit

    batch = submit(items=list(range(tasks * repeat)), command=["true"], start=False)
    root = Path(tempfile.mkdtemp(prefix="kiabatch-steps-"))
    next_index = iter(range(tasks * repeat))

    def steps() -> None:
        for _ in range(tasks):
            index = next(next_index)
            directory = root / f"t{index}"
            run([*KIABATCH, "task", "claim", "--batch", batch.id, "--index", str(index), "--dir", str(directory)])
            run(["/bin/sh", str(directory / "run.sh")], env={**os.environ, "KIABATCH_TASK_DIR": str(directory)})
            run([*KIABATCH, "task", "report", "--dir", str(directory)])

    def baseline() -> None:
        for _ in range(tasks):
            run([sys.executable, "-c", "import redis"])
            run(["/bin/sh", "-c", "true"])  # run.sh's share, the same for both
            run([sys.executable, "-c", "import redis"])

    result = bests(repeat, kiabatch=steps, baseline=baseline)
    assert batch.status().progress.done == tasks * repeat
    ratio = result["kiabatch"] / result["baseline"]
    emit("task claim + report of a 1-item task vs python -c 'import redis' as often", value=result["kiabatch"] / tasks,
         baseline=result["baseline"] / tasks, goal="<= 1.5", ok=ratio <= 1.5, tasks=tasks)  # fmt: skip
    batch.delete()
    shutil.rmtree(root, ignore_errors=True)


def bench_cli_start(repeat: int) -> None:
    """Issue 10 target 3: --version, status, list, results (local) vs `python -c "import redis, click"`."""
    from kiabatch import submit

    batch = submit(items=["a", "b", "c"], command=["echo", "{item}"], wait=True)
    commands = {"--version": ["--version"], "status": ["status", batch.id], "list": ["list"],
                "results": ["results", batch.id]}  # fmt: skip
    baseline = [sys.executable, "-c", "import redis, click"]
    for name, args in commands.items():
        result = bests(repeat, kiabatch=lambda a=args: run([*KIABATCH, *a]), baseline=lambda: run(baseline))
        ratio = result["kiabatch"] / result["baseline"]
        emit(f"kiabatch {name} start-up vs python -c 'import redis, click'", value=result["kiabatch"],
             baseline=result["baseline"], goal="<= 1.3", ok=ratio <= 1.3)  # fmt: skip
    batch.delete()


def bench_results(items: int, repeat: int) -> None:
    """Issue 10 target 4: results of a big batch stream: first line < 1 s, RSS < 100 MiB, <= 2x a pipelined scan."""
    from kiabatch.batch import open_store

    store = open_store()
    batch_id = "bench-results"
    store.delete(batch_id)
    finished_batch(store, batch_id, items)
    scan = ("import sys\nfrom kiabatch.connection import connect\nr = connect()\nn = 0\n"
            "for key in sys.argv[1:]:\n    cursor = 0\n    while True:\n"
            "        cursor, page = r.hscan(key, cursor, count=1000)\n        n += len(page)\n"
            "        if not cursor:\n            break\nprint(n)\n")  # fmt: skip
    from kiabatch import keys

    k = keys.batch_keys(batch_id)
    baseline_command = [sys.executable, "-c", scan, k.results, k.outcomes]
    for label, args in (("table", []), ("-o json", ["-o", "json"]), ("--raw", ["--raw"])):
        command = [*KIABATCH, *args[:2], "results", batch_id, *args[2:]] if args[:1] == ["-o"] else \
            [*KIABATCH, "results", batch_id, *args]  # fmt: skip
        result = medians(repeat, kiabatch=lambda c=command: run(c), baseline=lambda: run(baseline_command))
        _, rss = peak_rss_mib(command)
        first = first_line_seconds(command)
        ratio = result["kiabatch"] / result["baseline"]
        ok = ratio <= 2.0 and rss < 100 and first < 1.0
        emit(f"results ({label}) of {items:,} results vs a pipelined HSCAN of them", value=result["kiabatch"],
             baseline=result["baseline"], goal="<= 2.0, first line < 1 s, peak RSS < 100 MiB", ok=ok,
             first_line_seconds=round(first, 3), peak_rss_mib=round(rss, 1))  # fmt: skip
    store.delete(batch_id)


def first_line_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    process.stdout.readline()
    first = time.perf_counter() - started
    process.kill()
    process.wait()
    return first


def bench_status(items: int, batches: int, repeat: int) -> None:
    """Issue 10 target 5: status of a huge batch ~ status of a tiny one; list of 1,000 batches < 0.5 s."""
    from kiabatch.batch import open_store

    store = open_store()
    for batch_id in ("bench-huge", "bench-tiny"):
        store.delete(batch_id)
    finished_batch(store, "bench-huge", items)
    finished_batch(store, "bench-tiny", 10)
    result = bests(repeat, huge=lambda: run([*KIABATCH, "status", "bench-huge"]),
                   tiny=lambda: run([*KIABATCH, "status", "bench-tiny"]))  # fmt: skip
    ratio = result["huge"] / result["tiny"]
    emit(f"status of a {items:,}-item batch vs a 10-item batch", value=result["huge"], baseline=result["tiny"],
         goal="<= 1.2", ok=ratio <= 1.2)  # fmt: skip
    ids = [f"bench-list-{n:04d}" for n in range(batches)]
    for batch_id in ids:
        finished_batch(store, batch_id, 3)
    empty_home = tempfile.mkdtemp(prefix="kiabatch-empty-")
    try:
        empty_env = {**os.environ, "KIABATCH_HOME": empty_home}
        result = bests(repeat, full=lambda: run([*KIABATCH, "list", "--limit", str(batches)]),
                       empty=lambda: run([*KIABATCH, "list"], env=empty_env))  # fmt: skip
    finally:
        from kiabatch import embedded

        embedded.stop(Path(empty_home))
        shutil.rmtree(empty_home, ignore_errors=True)
    beyond = result["full"] - result["empty"]
    emit(f"list of {batches:,} batches, beyond start-up (seconds)", value=beyond, baseline=0.5, goal="< 0.5 s",
         ok=beyond < 0.5, list_seconds=round(result["full"], 3), startup_seconds=round(result["empty"], 3))  # fmt: skip
    for batch_id in ("bench-huge", "bench-tiny", *ids):
        store.delete(batch_id)


def bench_local(tasks: int, chunked_items: int) -> None:
    """Issue 10 target 6: local throughput vs xargs -P 2, and the submit process's peak RSS."""

    def xargs(count: int) -> float:
        return timed(lambda: subprocess.run(f"seq {count} | xargs -P 2 -n 1 true", shell=True, check=True))

    with tempfile.TemporaryDirectory() as scratch:
        lines = Path(scratch) / "items.txt"
        lines.write_text("".join(f"{n}\n" for n in range(max(tasks, chunked_items))))
        for label, count, extra, goal in (("tasks", tasks, [], 1.5), ("items --chunk 1000", chunked_items,
                                                                      ["--chunk", "1000"], 1.3)):  # fmt: skip
            lines.write_text("".join(f"{n}\n" for n in range(count)))
            baseline = xargs(count)
            seconds, rss = peak_rss_mib([*KIABATCH, "submit", "-q", "--lines", str(lines), "-p", "2", *extra, "--",
                                         "true"])  # fmt: skip
            ratio = seconds / baseline
            emit(f"local: {count:,} {label} of true at -p 2 vs seq | xargs -P 2 -n 1 true", value=seconds,
                 baseline=baseline, goal=f"<= {goal}, submit peak RSS < 100 MiB", ok=ratio <= goal and rss < 100,
                 peak_rss_mib=round(rss, 1))  # fmt: skip


def bench_pi(digits: int, repeat: int, goal: float | None) -> None:
    single = [sys.executable, str(REPO / "workers" / "pi"), "--digits", str(digits)]
    ours = [*KIABATCH, "submit", "pi", "-q", "--digits", str(digits), "--parallel", "2"]
    outputs: dict[str, str] = {}

    def capture(name: str, command: list[str]) -> Callable[[], None]:
        def action() -> None:
            outputs[name] = subprocess.run(command, check=True, capture_output=True, text=True).stdout

        return action

    result = medians(repeat, mpmath=capture("mpmath", single), kiabatch=capture("kiabatch", ours))
    assert outputs["mpmath"] == outputs["kiabatch"], "the digits differ"
    ratio = result["kiabatch"] / result["mpmath"]
    emit(f"pi {digits:,} digits, 2 tasks vs single-process mpmath", value=result["kiabatch"],
         baseline=result["mpmath"], goal=f"<= {goal}" if goal else "reported",
         ok=None if goal is None else ratio <= goal)  # fmt: skip


TARGETS = ("enqueue", "steps", "start", "results", "status", "local", "pi")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under two minutes); ratios are indicative")
    parser.add_argument("--only", choices=TARGETS, nargs="+", action="extend", metavar="TARGET",
                        help="run only these targets (several may follow one --only; repeatable)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the short measurements (medians)")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    chosen = set(args.only or TARGETS)
    home = tempfile.mkdtemp(prefix="kiabatch-bench-")
    os.environ["KIABATCH_HOME"] = home  # a fresh embedded Redis, stopped at the end
    os.environ.pop("KIABATCH_REDIS_URL", None)
    sys.path.insert(0, str(Path(__file__).parent))  # RQ resolves "bench.noop" from here
    # Byte-compile kiabatch as pip does when it installs a wheel: an editable checkout run with
    # PYTHONDONTWRITEBYTECODE would otherwise compile changed modules on every start-up measured.
    compileall.compile_dir(REPO / "kiabatch", quiet=1)
    quick = args.quick
    try:
        if "enqueue" in chosen:
            bench_enqueue(100_000 if quick else 1_000_000, repeat, 2_000 if quick else 20_000)
        if "steps" in chosen:
            bench_task_steps(5 if quick else 20, 3)
        if "start" in chosen:
            bench_cli_start(5 if quick else 15)
        if "results" in chosen:
            bench_results(100_000 if quick else 1_000_000, 1)
        if "status" in chosen:
            bench_status(100_000 if quick else 1_000_000, 200 if quick else 1000, 3 if quick else 5)
        if "local" in chosen:
            bench_local(5_000 if quick else 100_000, 20_000 if quick else 200_000)
        if "pi" in chosen:
            bench_pi(10**6, repeat, None)
            if not quick:
                bench_pi(10**7, repeat, 0.6)
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
