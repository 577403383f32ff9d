"""π: the worker's triples, the balanced split and the reduce give mpmath's digits, truncated."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiabatch import submit
from kiabatch.errors import UsageError
from kiabatch.workloads import local_runtime
from kiabatch.workloads.pi import (
    PiHelper,
    PiWorkload,
    _cost_before,
    balanced_ranges,
    combine_all,
    decode_triple,
    evaluate,
    reduce_with_helper,
    terms_for,
)
from tests.helpers import truth

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "workers" / "pi"
DIGITS = [1, 2, 13, 14, 15, 100, 5000, 100000]


def load_worker():
    loader = importlib.machinery.SourceFileLoader("pi_worker", str(WORKER))
    spec = importlib.util.spec_from_loader("pi_worker", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def pi_via_split(digits: int, tasks: int) -> str:
    worker = load_worker()
    ranges = balanced_ranges(terms_for(digits), tasks)
    terms = terms_for(digits)
    triples = [decode_triple(worker.encode(worker.split(a, b, need_p=b != terms))) for a, b in ranges]
    _, q, t = combine_all(triples)
    return evaluate(q, t, digits)


@pytest.mark.parametrize("digits", DIGITS)
@pytest.mark.parametrize("tasks", [1, 2, 3, 4])
def test_split_and_reduce_give_the_truncated_digits(digits, tasks):
    if tasks > terms_for(digits):
        pytest.skip("more tasks than terms is refused (tested below)")
    result = pi_via_split(digits, tasks)
    assert result == truth(digits)
    assert len(result) == digits + 2 and result.startswith("3.")


def test_truncation_not_rounding():
    # The 6th decimal is 2 followed by 6: rounding would give 3.141593.
    assert pi_via_split(5, 2) == "3.14159"
    assert pi_via_split(6, 2) == "3.141592"


def test_the_plain_python_integer_backend_gives_the_same_digits():
    """MPMATH_NOGMPY=1: mpmath falls back to Python integers; worker and reduce still agree."""
    script = f"""
import sys, mpmath.libmp
assert mpmath.libmp.BACKEND == "python", mpmath.libmp.BACKEND
sys.path.insert(0, {str(REPO)!r})
from tests.test_pi import pi_via_split, DIGITS
from tests.helpers import truth
for digits in DIGITS:
    for tasks in (1, 3):
        assert pi_via_split(digits, tasks) == truth(digits), (digits, tasks)
print("ok")
"""
    env = {**os.environ, "MPMATH_NOGMPY": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_worker_plain_mode_prints_pi_to_n_decimals():
    for digits in (1, 15, 1000):
        done = subprocess.run(
            [sys.executable, str(WORKER), "--digits", str(digits)], capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == truth(digits)


def test_the_worker_refuses_bad_arguments_with_usage_errors():
    for args in (["--digits", "0"], ["--range", "5", "5"], []):
        done = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True)
        assert done.returncode == 2 and "error" in done.stderr


def test_the_workers_never_import_kiabatch():
    import ast

    for program in (REPO / "workers").iterdir():
        tree = ast.parse(program.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "kiabatch" not in imported, program


def test_balanced_ranges_cover_the_series_and_even_out_the_cost():
    terms = terms_for(10**6)
    for tasks in (2, 3, 8):
        ranges = balanced_ranges(terms, tasks)
        assert ranges[0][0] == 0 and ranges[-1][1] == terms
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(tasks - 1))
        costs = [_cost_before(b) - _cost_before(a) for a, b in ranges]
        assert max(costs) / min(costs) < 1.001
        # ... and are not simply equal-length ranges (later terms are bigger).
        assert ranges[0][1] - ranges[0][0] > ranges[-1][1] - ranges[-1][0]


def test_more_tasks_than_terms_is_refused():
    runtime = local_runtime()
    with pytest.raises(UsageError, match=r"tasks 5 is more than the 4 Chudnovsky terms 1 digits need"):
        PiWorkload().plan(runtime, parallel=1, tasks=5, digits=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"digits": 0}, "digits must be a positive integer"),
        ({"digits": -3}, "digits must be a positive integer"),
        ({"digits": "12"}, "digits must be a positive integer"),
        ({"digits": 2.5}, "digits must be a positive integer"),
        ({"digits": 10**8 + 1}, "add --force"),
        ({"digits": 10, "colour": "red"}, "unknown option"),
    ],
)
def test_bad_pi_options_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        PiWorkload().plan(local_runtime(), parallel=1, tasks=None, **options)


@pytest.mark.parametrize(
    ("digits", "parallel", "tasks"), [(5000, 3, None), (100, 2, 5), (100000, 2, 4), (150000, 2, 3)]
)
def test_a_pi_batch_through_the_local_backend_prints_the_truth(redis_url, home, digits, parallel, tasks):
    batch = submit("pi", digits=digits, parallel=parallel, tasks=tasks, wait=True, home=home)
    assert batch.status().progress.done == (tasks or parallel)
    assert batch.reduce() == truth(digits)


def test_large_numbers_convert_to_decimal_the_same_in_one_or_two_processes():
    from mpmath.libmp import MPZ

    from kiabatch.workloads import pi as pi_module

    if not hasattr(MPZ(1), "digits"):
        pytest.skip("needs gmpy2")
    n = MPZ(7) ** 4_000_000  # ~3.4 million digits: above the two-process threshold
    assert n.bit_length() > pi_module._FORK_CONVERSION_BITS
    assert pi_module._decimal_text_in_two_processes(n) == str(n)
    assert pi_module.decimal_text(MPZ(10) ** 3_000_000) == "1" + "0" * 3_000_000


def worker_triples(digits: int, tasks: int) -> list[tuple[int, int, int]]:
    worker = load_worker()
    terms = terms_for(digits)
    ranges = balanced_ranges(terms, tasks)
    return [decode_triple(worker.encode(worker.split(a, b, need_p=b != terms))) for a, b in ranges]


def helper_pid(helper: PiHelper) -> int:
    assert helper._process is not None
    return helper._process.pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("root", ["ready", "still being computed"])
@pytest.mark.parametrize("tasks", [1, 2, 3, 4])
def test_the_reduce_shared_with_a_helper_process_gives_the_truth(tasks, root):
    digits = 150_001
    triples = worker_triples(digits, tasks)
    helper = PiHelper(digits)
    pid = helper_pid(helper)
    if root == "ready":
        deadline = time.monotonic() + 30
        while not helper.root_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert helper.root_ready()
    else:  # frozen before it can say so: the reduce takes the other share of the work, then waits
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(0.3, os.kill, (pid, signal.SIGCONT)).start()
        assert not helper.root_ready()
    assert reduce_with_helper(triples, digits, helper) == truth(digits)
    helper.close()
    assert gone(pid)


class HelperKilledAt(PiHelper):
    """A real helper process, SIGKILLed just before the request ``when`` is sent."""

    def __init__(self, digits: int, when: str) -> None:
        super().__init__(digits)
        self.when = when

    def _send(self, head: bytes, *numbers: int) -> None:
        if head[:1] == self.when.encode() and self._process is not None:
            os.kill(self._process.pid, 9)
            self._process.wait()
        super()._send(head, *numbers)


@pytest.mark.parametrize("when", ["R", "N", "H"])
def test_a_helper_that_dies_leaves_the_reduce_to_this_process(when):
    digits = 120_000
    triples = worker_triples(digits, 1 if when == "R" else 3)  # one task: only the root is asked
    helper = HelperKilledAt(digits, when)
    pid = helper_pid(helper)
    assert reduce_with_helper(triples, digits, helper) == truth(digits)
    assert gone(pid)


class HelperWrongBy(PiHelper):
    """A real helper whose high-half quotient is then off by ``delta``."""

    def __init__(self, digits: int, delta: int) -> None:
        super().__init__(digits)
        self.delta = delta

    def high(self, fallback):
        return super().high(fallback) + self.delta


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_wrong_quotient_from_the_helper_is_caught_and_not_used(delta):
    digits = 130_000
    helper = HelperWrongBy(digits, delta)
    assert reduce_with_helper(worker_triples(digits, 2), digits, helper) == truth(digits)


def test_the_workload_reduce_starts_and_stops_its_own_helper_when_none_was_prepared():
    from kiabatch.model import ItemResult

    digits = 110_000
    terms = terms_for(digits)
    ranges = balanced_ranges(terms, 2)
    worker = load_worker()
    results = [
        ItemResult(
            index=i,
            position=0,
            item={"a": a, "b": b},
            exit_code=0,
            duration=0.0,
            attempt=1,
            inline=worker.encode(worker.split(a, b, need_p=b != terms)),
        )
        for i, (a, b) in reversed(list(enumerate(ranges)))
    ]
    before = set(child_pids())
    assert PiWorkload().reduce(results, {"digits": digits}) == truth(digits)
    assert set(child_pids()) <= before  # the helper it started is gone


def test_prepare_starts_a_helper_only_for_large_batches():
    assert not isinstance(PiWorkload().prepare({"digits": 100_000}), PiHelper)  # the root itself
    helper = PiWorkload().prepare({"digits": 100_001})
    assert isinstance(helper, PiHelper)
    pid = helper_pid(helper)
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19  # it takes only what the tasks leave
    del helper  # an abandoned batch's helper does not outlive it
    assert gone(pid)


def child_pids() -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process().children() if child.status() != psutil.STATUS_ZOMBIE]


def reference_split(a: int, b: int) -> tuple[int, int, int]:
    """Plain binary splitting down to single terms (Python ints): the oracle for the worker's leaves."""
    if b - a == 1:
        if a == 0:
            return 1, 1, 13591409
        p = -(6 * a - 5) * (2 * a - 1) * (6 * a - 1)
        return p, a**3 * (640320**3 // 24), p * (13591409 + 545140134 * a)
    middle = (a + b) // 2
    p1, q1, t1 = reference_split(a, middle)
    p2, q2, t2 = reference_split(middle, b)
    return p1 * p2, q1 * q2, t1 * q2 + p1 * t2


@pytest.mark.parametrize(
    ("a", "b"), [(0, 1), (0, 2), (1, 2), (0, 16), (0, 17), (3, 19), (5, 40), (0, 333), (1000, 1345)]
)
def test_the_worker_splits_exactly_as_plain_binary_splitting(a, b):
    worker = load_worker()
    p, q, t = reference_split(a, b)
    assert tuple(map(int, worker.split(a, b))) == (p, q, t)
    assert tuple(map(int, worker.split(a, b, need_p=False))) == (0, q, t)


def load_helper_module():
    loader = importlib.machinery.SourceFileLoader("pi_helper_module", str(REPO / "kiabatch/workloads/_pi_helper.py"))
    spec = importlib.util.spec_from_loader("pi_helper_module", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@settings(max_examples=300, deadline=None)
@given(
    x=st.integers(min_value=-(2**3000), max_value=2**3000),
    y=st.integers(min_value=1, max_value=2**3000),
    shift=st.integers(min_value=0, max_value=6500),
)
def test_a_product_from_leading_bits_is_within_two_units_of_the_exact_one(x, y, shift):
    from mpmath.libmp import MPZ

    from kiabatch.workloads.pi import _scaled_product

    assert abs(int(_scaled_product(MPZ(x), MPZ(y), shift)) - ((x * y) >> shift)) <= 2


@settings(max_examples=300, deadline=None)
@given(
    numerator=st.integers(min_value=1, max_value=2**4000),
    denominator=st.integers(min_value=1, max_value=2**1500),
    half=st.integers(min_value=0, max_value=300),
)
def test_the_helpers_high_quotient_is_exact_or_one_off(numerator, denominator, half):
    high_quotient = load_helper_module().high_quotient
    exact = numerator // (denominator * 10**half)
    assert abs(int(high_quotient(numerator, denominator, half)) - exact) <= 1


def test_the_helpers_high_quotient_is_exact_away_from_a_boundary():
    """One off only when the exact quotient sits within 2^-60 of a whole number: not for π's digits."""
    high_quotient = load_helper_module().high_quotient
    digits = 200_000
    numerator, denominator = MPZ_pi_fraction(digits)
    for half in (0, 1, 1000, digits // 3, digits // 2):
        assert high_quotient(numerator, denominator, half) == numerator // (denominator * 10**half)


def MPZ_pi_fraction(digits: int) -> tuple[int, int]:
    """π·10^digits as a fraction of two big integers (from the worker's whole-series triple)."""
    from kiabatch.workloads.pi import sqrt_10005

    _, q, t = worker_triples(digits, 1)[0]
    return 426880 * sqrt_10005(digits) * q, t


def test_the_workers_range_mode_does_not_import_mpmath():
    """Each task starts in a blink: integers come from gmpy2 directly (mpmath takes longer to import)."""
    probe = (
        "import atexit, runpy, sys; atexit.register(lambda: print('mpmath' in sys.modules, file=sys.stderr)); "
        f"sys.argv = ['pi'] + sys.argv[1:]; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
    )
    ranged = subprocess.run([sys.executable, "-c", probe, "--range", "0", "50", "--of", "50"], capture_output=True)
    assert ranged.returncode == 0 and ranged.stderr.decode().split() == ["False"]
    _, q, t = reference_split(0, 50)
    assert tuple(map(int, decode_triple(ranged.stdout))) == (0, q, t)
    plain = subprocess.run([sys.executable, "-c", probe, "--digits", "5"], capture_output=True, text=True)
    assert plain.stdout.strip() == truth(5) and plain.stderr.split() == ["True"]


def test_a_helper_that_cannot_be_started_leaves_the_reduce_to_this_process():
    """Out of file descriptors, Popen fails: the digits come out all the same (it was a
    'Too many open files' error, exit 2, and no digits)."""
    digits = 120_000
    script = f"""
import os, resource, sys
sys.path.insert(0, {str(REPO)!r})
from kiabatch.model import ItemResult
from kiabatch.workloads.pi import PiWorkload, balanced_ranges, terms_for
from tests.test_pi import load_worker
worker, terms = load_worker(), terms_for({digits})
results = [ItemResult(index=i, position=0, item={{"a": a, "b": b}}, exit_code=0, duration=0.0, attempt=1,
                      inline=worker.encode(worker.split(a, b, need_p=b != terms)))
           for i, (a, b) in enumerate(balanced_ranges(terms, 3))]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(PiWorkload().reduce(results, {{"digits": {digits}}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == truth(digits)


def test_a_frozen_helper_is_given_up_after_its_stall_timeout_and_the_digits_are_right():
    """SIGSTOP without SIGCONT hung the reduce for ever; now it waits a bounded time, then works alone."""
    digits = 130_000
    triples = worker_triples(digits, 2)
    helper = PiHelper(digits)
    pid = helper_pid(helper)
    helper.stall_timeout = 1.0
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert reduce_with_helper(triples, digits, helper) == truth(digits)
        assert time.monotonic() - started < 30
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    helper.close()
    assert gone(pid)


def test_the_helper_without_gmpy2_converts_more_than_python_s_4300_digit_limit():
    """With plain Python integers the helper's str() hit the 4300-digit cap and it died every time
    (the parent then did its work: right digits, the helper's effort wasted)."""
    module = load_helper_module()
    probe = (
        "import runpy, sys; sys.modules['gmpy2'] = None; sys.argv = ['helper', '6000']; "
        f"runpy.run_path({str(REPO / 'kiabatch/workloads/_pi_helper.py')!r}, run_name='__main__')"
    )
    request = b"N" + (0).to_bytes(8, "big") + module.framed(module.magnitude(7)) + module.framed(module.magnitude(1))
    request += b"H" + (0).to_bytes(8, "big") + module.framed(module.magnitude(1))
    done = subprocess.run([sys.executable, "-c", probe], input=request, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    reply = done.stdout
    assert reply[:1] == b"!"
    numerator_size = int.from_bytes(reply[1:9], "big")
    numerator = int.from_bytes(reply[9 : 9 + numerator_size], "big")
    rest = reply[9 + numerator_size :]
    high_size = int.from_bytes(rest[:8], "big")
    text = rest[16 + high_size :].decode()
    from kiabatch.workloads.pi import decimal_text

    assert numerator > 10**6000 and text == decimal_text(int(numerator))  # splits Python ints: no cap
