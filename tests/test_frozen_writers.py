"""Output is never cut short by a freeze and thaw (SIGSTOP/SIGCONT, Ctrl-Z then ``fg``).

Under PYTHONUNBUFFERED (set in many images, this project's included) a Python
program's stdout is a raw file: one write(2) to a full pipe that a stop signal
interrupts writes part of the buffer, and the rest was silently dropped, exit 0.
Found by freezing workers during a π batch: a task "succeeded" with a truncated
triple. Each test holds a pipe full (nobody reads it) while the writer is
frozen and thawed many times, then reads everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiabatch import Batch, submit
from kiabatch.errors import BatchFailedError
from kiabatch.store import ItemOutcome
from tests.helpers import kiabatch_cmd, truth

REPO = Path(__file__).resolve().parent.parent


def output_through_freezes(argv: list[str], env: dict[str, str] | None = None) -> tuple[bytes, int]:
    """Run ``argv`` (unbuffered Python), freeze and thaw it 40 times while its stdout pipe is full, then read it all."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    time.sleep(1.0)  # it starts and fills the pipe; nobody reads yet, so its write(2) blocks
    for _ in range(40):
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGSTOP)
        time.sleep(0.005)
        process.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    output, _ = process.communicate(timeout=60)
    return output, process.returncode


def test_the_cli_prints_every_byte_of_a_large_result_through_a_freeze(redis_url, home):
    big = 4_000_000
    batch = submit(items=["x"], command=["head", "-c", str(big), "/dev/zero"], wait=True, home=home)
    output, code = output_through_freezes(kiabatch_cmd("results", "--raw", batch.id))
    assert code == 0
    assert len(output) == big


def test_the_pi_worker_writes_every_digit_through_a_freeze():
    digits = 300_000  # ~300 kB of text: more than a pipe holds
    output, code = output_through_freezes([sys.executable, str(REPO / "workers" / "pi"), "--digits", str(digits)])
    assert code == 0
    assert output.decode() == truth(digits) + "\n"


def test_a_result_that_is_not_a_triple_fails_the_reduce_with_one_clear_error(redis_url, home):
    batch = submit("pi", digits=2000, parallel=2, tasks=2, start=False, home=home)
    store = batch.store
    for index in range(2):
        claim = store.claim(batch.id, index)
        cut = b"KBPI1\n\x00" + (10**6).to_bytes(8, "big") + b"\x07" * 100  # says 1 MB, carries 100 bytes
        store.report(batch.id, index, claim.attempt, claim.sha1, [ItemOutcome(ok=True, exit_code=0, duration=0.1,
                     result=cut)], claimed_items=claim.items)  # fmt: skip
    with pytest.raises(BatchFailedError, match=r"cannot reduce batch .*: the result of task 0 is not a pi triple: cut"):
        Batch(batch.id, home=home).reduce()
