"""The π workload: a parallel map/reduce over the Chudnovsky series.

Map: the series' terms [0, N) are cut into T ranges of equal *cost* (a term's
integers grow with its index, so equal-length ranges would leave the last task
with the most work). Each task runs ``workers/pi --range A B``, which writes the
binary-splitting triple (P, Q, T) of its range.

Reduce (client-side): the triples are combined pairwise in series order into the
triple of [0, N), and π = 426880·√10005·Q/T is evaluated in integer arithmetic
to D decimals plus guard digits, then truncated. A helper process (``prepare``
starts it at low priority while the tasks run) computes √10005 and, during the
reduce, the numerator Q·√10005 while this process computes T: the big products
use both cores.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import select
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mpmath.libmp import MPZ, isqrt

from ..errors import UsageError
from ..limits import MAX_DIGITS, MAX_DIGITS_FORCED
from ..model import ItemResult, WorkerSpec
from ._pi_helper import framed, magnitude
from .base import Plan, Runtime

#: Decimal digits each Chudnovsky term adds: log10(640320^3 / (24*6*2*6)).
DIGITS_PER_TERM = math.log10(151931373056000)
#: Extra digits of series accuracy beyond what is printed.
_SERIES_MARGIN = 30
_GUARD_DIGITS = 20
_MAGIC = b"KBPI1\n"


def terms_for(digits: int) -> int:
    """Series terms needed for ``digits`` decimals (with a safety margin)."""
    return math.ceil((digits + _SERIES_MARGIN) / DIGITS_PER_TERM) + 1


def _cost_before(m: int) -> float:
    """Approximate bits in the terms [0, m): |p(k)|·q(k) has ~59.5 + 6·log2(k) bits."""
    if m <= 1:
        return 60.0 * m
    return 60.0 + 59.5 * (m - 1) + 6 * math.lgamma(m) / math.log(2)


def balanced_ranges(terms: int, tasks: int) -> list[tuple[int, int]]:
    """Cut [0, terms) into ``tasks`` non-empty ranges of about equal cost."""
    if not 1 <= tasks <= terms:
        raise ValueError(f"need 1 <= tasks <= terms, got {tasks} tasks for {terms} terms")
    total = _cost_before(terms)
    cuts = [0]
    for j in range(1, tasks):
        target = total * j / tasks
        # Smallest m with cost_before(m) >= target, kept strictly increasing and
        # leaving at least one term for every later range.
        m = bisect.bisect_left(range(terms + 1), target, key=_cost_before)
        m = max(m, cuts[-1] + 1)
        m = min(m, terms - (tasks - j))
        cuts.append(m)
    cuts.append(terms)
    return list(itertools.pairwise(cuts))


def decode_triple(data: bytes) -> tuple[int, int, int]:
    """Parse the worker's binary triple (see workers/pi)."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a pi triple (bad magic)")
    offset, numbers = len(_MAGIC), []
    for _ in range(3):
        start = offset + 9
        length = int.from_bytes(data[offset + 1 : start], "big")
        if start + length > len(data) or data[offset : offset + 1] not in (b"\x00", b"\x01"):
            raise ValueError(f"cut short or damaged ({len(data):,} bytes)")
        value = MPZ(int.from_bytes(data[start : start + length], "big"))
        numbers.append(-value if data[offset] == 1 else value)
        offset = start + length
    if offset != len(data):
        raise ValueError(f"{len(data) - offset:,} bytes follow the triple")
    return numbers[0], numbers[1], numbers[2]


def combine(left: tuple[int, int, int], right: tuple[int, int, int]) -> tuple[int, int, int]:
    """Triple of [a, c) from the triples of [a, b) and [b, c).

    A P of 0 means "not computed" (the series' last range); it stays 0, and only
    the right-hand P may be missing, as no sum needs it.
    """
    p1, q1, t1 = left
    p2, q2, t2 = right
    return (p1 * p2 if p2 else MPZ(0)), q1 * q2, t1 * q2 + p1 * t2


def combine_all(triples: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """Combine adjacent triples pairwise (a balanced tree keeps the products even)."""
    while len(triples) > 1:
        paired = [combine(triples[i], triples[i + 1]) for i in range(0, len(triples) - 1, 2)]
        if len(triples) % 2:
            paired.append(triples[-1])
        triples = paired
    return triples[0]


def sqrt_10005(digits: int) -> int:
    """floor(√10005 · 10^(digits + guard)), the slow part that overlaps the map step."""
    return isqrt(MPZ(10005) * MPZ(10) ** (2 * (digits + _GUARD_DIGITS)))


#: Below this many digits the reduce takes milliseconds: a helper process would cost more than it saves.
_HELPER_DIGITS = 100_000
_HELPER = Path(__file__).with_name("_pi_helper.py")
#: The least time a helper's reply may stall before this process takes over (plus 1 s per 100,000 digits).
_STALL_SECONDS = 60.0


_T = TypeVar("_T")


def _number(body: bytes) -> Any:
    """A reply's magnitude as an integer of mpmath's backend."""
    return MPZ(int.from_bytes(body, "big"))


class PiHelper:
    """A child process (``_pi_helper.py``) that computes √10005, the numerator of π's division
    and the high part of its digits.

    The reduce's big products then use both cores: the helper multiplies Q and the
    root while this process computes T, then converts the high digits while this
    process divides and converts the low ones (gmpy2 holds the GIL, so
    not a thread).
    Started by ``prepare`` while the tasks run, it gets the lowest CPU priority and
    takes only what the local workers leave; with the tasks on a cluster it has the
    machine to itself. If it fails in any way, this process does its work instead.
    """

    def __init__(self, digits: int, *, low_priority: bool = False) -> None:
        self.digits = digits
        #: Seconds a reply may stall (no byte arriving) before this process does the work itself:
        #: a frozen helper must not hang the reduce, a slow one on a busy machine should finish.
        self.stall_timeout = _STALL_SECONDS + digits / 1e5
        try:
            process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, str(_HELPER), str(digits + _GUARD_DIGITS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:  # no process to be had (out of file descriptors or processes): all work is done here
            process = None
        self._process = process
        if low_priority and process is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, process.pid, 19)
        # An abandoned batch (failed, never reduced) leaves no process behind.
        self.close = weakref.finalize(self, _stop_process, process)
        self._pending: tuple[int, int, int] | None = None
        self._ready = False  # the helper's "root computed" mark has been read

    def root_ready(self) -> bool:
        """True once the helper has computed the root (never waits)."""
        if not self._ready and self._process is not None and self._process.stdout is not None:
            try:
                readable, _, _ = select.select([self._process.stdout.fileno()], [], [], 0)
                if readable:
                    self._read(0)  # consumes the mark (or finds the helper gone)
            except (OSError, EOFError, ValueError, TimeoutError):
                self.abandon()
        return self._ready

    def root(self) -> int:
        """floor(√10005 · 10^(digits + guard)), as :func:`sqrt_10005`."""
        return self._ask(b"R", lambda: sqrt_10005(self.digits))

    def start_numerator(self, q1: int, q2: int, excess: int) -> None:
        """Ask for 426880 · root · ((q1·q2) >> excess); :meth:`numerator` collects it."""
        self._pending = (q1, q2, excess)
        try:
            self._send(b"N" + excess.to_bytes(8, "big"), q1, q2)
        except OSError:
            self.abandon()

    def numerator(self) -> int:
        """The value :meth:`start_numerator` asked for."""
        assert self._pending is not None, "start_numerator first"
        q1, q2, excess = self._pending
        self._pending = None
        return self._ask(None, lambda: 426880 * sqrt_10005(self.digits) * ((q1 * q2) >> excess))

    def start_high(self, denominator: int, half: int) -> None:
        """Ask for numerator // (denominator · 10^half) and its digits; :meth:`high` and
        :meth:`high_text` collect them (after :meth:`numerator`)."""
        try:
            self._send(b"H" + half.to_bytes(8, "big"), denominator)
        except OSError:
            self.abandon()

    def high(self, fallback: Callable[[], int]) -> int:
        """The quotient :meth:`start_high` asked for (``fallback()`` if the helper failed)."""
        return self._ask(None, fallback)

    def high_text(self, fallback: Callable[[], str]) -> str:
        """That quotient's decimal digits (``fallback()`` if the helper failed)."""
        return self._ask(None, fallback, lambda body: body.decode("ascii"))

    def _send(self, head: bytes, *numbers: int) -> None:
        if self._process is None or self._process.stdin is None or self._process.stdin.closed:
            raise OSError("no helper")
        self._process.stdin.write(head + b"".join(framed(magnitude(number)) for number in numbers))
        self._process.stdin.flush()

    def _ask(self, op: bytes | None, fallback: Callable[[], _T], decode: Callable[[bytes], _T] = _number) -> _T:
        """Send ``op`` (None: already sent) and decode the reply, else compute ``fallback()``."""
        try:
            if op is not None:
                self._send(op)
            return decode(self._read(int.from_bytes(self._read(8), "big")))
        except (OSError, EOFError, UnicodeDecodeError):  # TimeoutError is an OSError
            self.abandon()
            return fallback()

    def _read(self, size: int) -> bytes:
        """``size`` bytes of a reply (after the "root ready" mark), read straight from the pipe so that
        each wait is bounded: TimeoutError if no byte comes for :attr:`stall_timeout` seconds."""
        if self._process is None or self._process.stdout is None or self._process.stdout.closed:
            raise OSError("no helper")
        if not self._ready:  # every reply follows the mark
            if self._read_exactly(1) != b"!":
                raise EOFError("the helper stopped")
            self._ready = True
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        parts, missing = [], size
        while missing:
            readable, _, _ = select.select([fd], [], [], self.stall_timeout)
            if not readable:
                raise TimeoutError(f"the helper sent nothing for {self.stall_timeout:.0f}s")
            chunk = os.read(fd, min(missing, 1 << 20))
            if not chunk:
                raise EOFError("the helper stopped")
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)

    def abandon(self) -> None:
        """Stop the helper: what is asked later is computed in this process."""
        self.close()
        self._process = None


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    if process.poll() is None:
        process.kill()
    process.wait()


def _root_bits(digits: int) -> int:
    """About the bit length of :func:`sqrt_10005` (within a few bits)."""
    return int(math.log2(10005) / 2 + (digits + _GUARD_DIGITS) * math.log2(10)) + 1


#: The share of π's digits this process converts (the low ones); the helper converts the rest.
#: Half each: this process divides in full, the helper only to its quotient's leading bits,
#: which takes about as long as the subtraction and wait here.
_LOW_SHARE = 0.5


def _leading(x: int, y: int, shift: int) -> tuple[int, int, int]:
    """``x``, ``y`` cut to the leading bits that decide about ``x·y >> shift``, and what is left of ``shift``.

    Each factor keeps 64 bits more than the result has, so ``(x'·y') >> shift'``
    is within a unit or two of ``(x·y) >> shift``: a quarter of the work when the
    factors are much longer than the result.
    """
    keep = max(0, abs(x).bit_length() + abs(y).bit_length() - shift) + 64
    cut_x = max(0, abs(x).bit_length() - keep)
    cut_y = max(0, abs(y).bit_length() - keep)
    return x >> cut_x, y >> cut_y, shift - cut_x - cut_y


def _scaled_product(x: int, y: int, shift: int) -> int:
    """About ``(x·y) >> shift`` (within a unit or two), from the leading bits of ``x`` and ``y``."""
    x, y, shift = _leading(x, y, shift)
    product = x * y
    return product >> shift if shift >= 0 else product << -shift


def reduce_with_helper(triples: list[tuple[int, int, int]], digits: int, helper: PiHelper) -> str:
    """π from the tasks' triples, the last combine and the digits shared with ``helper``.

    Only Q/T's leading bits matter, so Q and T are both divided by the same 2^excess
    (keeping 128 more bits than the root has), and each product of the last combine
    is formed from its factors' leading bits only (T1·Q2 needs those 128 bits,
    P1·T2, some 10^(14·terms) times smaller, far fewer). The helper forms
    426880·root·Q from such cut factors while this process forms T. Then, with
    S = NUM // DEN ≈ π·10^(digits+guard) and P = 10^half, the helper computes
    S // P and its digits, while this process computes S and the digits of S - (S // P)·P.
    """
    if len(triples) < 2:
        _, q, t = triples[0]
        return evaluate(q, t, digits, helper.root())
    middle = len(triples) // 2
    p1, q1, t1 = combine_all(triples[:middle])
    _, q2, t2 = combine_all(triples[middle:])
    excess = max(0, q1.bit_length() + q2.bit_length() - _root_bits(digits) - 128)
    cut_q1, cut_q2, q_shift = _leading(q1, q2, excess)
    if helper.root_ready():
        helper.start_numerator(cut_q1, cut_q2, q_shift)
        denominator = _scaled_product(t1, q2, excess) + _scaled_product(p1, t2, excess)
    else:  # busy tasks left it little CPU: it finishes the root while this process computes Q too
        denominator = _scaled_product(t1, q2, excess) + _scaled_product(p1, t2, excess)
        helper.start_numerator((cut_q1 * cut_q2) >> q_shift, MPZ(1), 0)
    numerator = helper.numerator()
    # S has digits + guard + 1 digits; this process also divides, so the helper converts more of them.
    half = int((digits + _GUARD_DIGITS) * _LOW_SHARE)
    helper.start_high(denominator, half)
    scaled = numerator // denominator
    power = MPZ(10) ** half
    high = helper.high(lambda: scaled // power)
    low = scaled - high * power
    if not 0 <= low < power:  # the helper's quotient is one off (rarely) or wrong: do not depend on it
        helper.abandon()
        high, low = divmod(scaled, power)
    low_text = decimal_text(low, parallel=False).rjust(half, "0")
    return pi_text(helper.high_text(lambda: decimal_text(high)) + low_text, digits)


def evaluate(q: int, t: int, digits: int, root: int | None = None) -> str:
    """π to ``digits`` decimals, truncated, from the triple of the whole series."""
    root = root if root is not None else sqrt_10005(digits)
    # Only Q/T's leading bits matter: drop those beyond the precision (plus 64) first,
    # which makes the final product and division markedly cheaper.
    excess = t.bit_length() - root.bit_length() - 64
    if excess > 0:
        q, t = q >> excess, t >> excess
    return pi_text(decimal_text((426880 * root * q) // t), digits)


def pi_text(text: str, digits: int) -> str:
    """``3.14...`` to ``digits`` decimals from the decimal ``text`` of π·10^(digits+guard), within ±3."""
    guard = int(text[-_GUARD_DIGITS:])
    if not 2 < guard < 10**_GUARD_DIGITS - 3:
        # The truncation point sits within the error bound: a run of 20 nines or
        # zeros. Never seen below 10^8 digits; refuse rather than guess.
        raise ArithmeticError(f"cannot decide digit {digits} of pi from {_GUARD_DIGITS} guard digits")
    return f"{text[0]}.{text[1:-_GUARD_DIGITS]}"


def decimal_text(n: int, *, parallel: bool = True) -> str:
    """Decimal digits of ``n`` >= 0, fast for gmpy2 integers and unlimited for Python ones.

    Python caps ``str(int)`` at 4300 digits (and mpmath's conversion inherits
    the cap); rather than lift it for the whole process, split the number. A large
    gmpy2 integer is converted in two processes unless ``parallel`` is False.
    """
    if not isinstance(n, int):  # gmpy2.mpz: GMP's subquadratic conversion, no cap
        if (
            parallel
            and n.bit_length() > _FORK_CONVERSION_BITS
            and getattr(os, "fork", None) is not None
            and threading.active_count() == 1
        ):
            return _decimal_text_in_two_processes(n)
        return str(n)
    if n < 10**4000:
        return str(n)
    half = int(n.bit_length() * 0.30103) // 2  # about half its decimal digits
    high, low = divmod(n, 10**half)
    return decimal_text(high) + decimal_text(low).rjust(half, "0")


# Above ~2 million digits, converting the two halves in two processes (the map step
# has finished, so both cores are free) saves about a third of the conversion time.
_FORK_CONVERSION_BITS = 6_600_000


def _decimal_text_in_two_processes(n: Any) -> str:
    """``str(n)``, the low half converted by a forked child.

    Only called when this process has a single thread, so the child cannot inherit
    a lock held by another thread. Falls back to ``str(n)`` if anything goes wrong.
    """
    half = int(n.bit_length() * 0.30103) // 2
    high, low = divmod(n, MPZ(10) ** half)
    try:
        read_end, write_end = os.pipe()
    except OSError:  # out of file descriptors
        return str(n)
    try:
        child = os.fork()
    except OSError:  # out of processes or memory
        os.close(read_end)
        os.close(write_end)
        return str(n)
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            view = memoryview(str(low).rjust(half, "0").encode())
            while view:
                view = view[os.write(write_end, view) :]
        finally:
            os._exit(0)
    os.close(write_end)
    text = str(high)
    with os.fdopen(read_end, "rb") as pipe:
        tail = pipe.read().decode()
    _, status = os.waitpid(child, 0)
    if status != 0 or len(tail) != half:
        return str(n)
    return text + tail


class PiWorkload:
    """``kiabatch submit pi --digits D``: digits of π as a parallel map/reduce."""

    name = "pi"
    #: Makes its own items and command.
    takes_command = False
    option_names = ("digits", "force")
    description = "digits of pi: Chudnovsky series split across tasks, combined client-side"

    def plan(
        self,
        runtime: Runtime,
        *,
        parallel: int,
        tasks: int | None,
        digits: int = 1000,
        force: bool = False,
        **unknown: Any,
    ) -> Plan:
        """Items are the term ranges; one range per task."""
        if unknown:
            raise UsageError(f"unknown option(s) for workload pi: {', '.join(sorted(unknown))}; allowed: digits, force")
        if isinstance(digits, bool) or not isinstance(digits, int):
            raise UsageError(f"digits must be a positive integer, not {digits!r}")
        if not 1 <= digits <= MAX_DIGITS_FORCED:
            raise UsageError(
                f"digits must be a positive integer up to {MAX_DIGITS:,} "
                f"({MAX_DIGITS_FORCED:,} with force), not {digits}"
            )
        if digits > MAX_DIGITS and not force:
            raise UsageError(f"digits {digits:,} is more than {MAX_DIGITS:,}; add --force to compute it anyway")
        terms = terms_for(digits)
        wanted = tasks if tasks is not None else parallel
        if wanted > terms:
            raise UsageError(
                f"tasks {wanted} is more than the {terms} Chudnovsky terms {digits} digits need; "
                f"use at most {terms} (tasks defaults to --parallel)"
            )
        ranges = balanced_ranges(terms, wanted)
        command = [*runtime.worker_command("pi"), "--range", "{a}", "{b}", "--of", str(terms)]
        worker = WorkerSpec(command=command)
        return Plan(
            items=[{"a": a, "b": b} for a, b in ranges],
            worker=worker,
            options={"digits": digits},
            tasks=len(ranges),  # one range per task (a count: π's users choose --tasks, never --chunk)
        )

    def prepare(self, options: dict[str, Any]) -> Any:
        """√10005 at the batch's precision: a low-priority helper process started while the tasks
        run (computed at once when it is small)."""
        digits = int(options["digits"])
        return PiHelper(digits, low_priority=True) if digits > _HELPER_DIGITS else sqrt_10005(digits)

    def reduce(self, results: list[ItemResult], options: dict[str, Any], prepared: Any = None) -> str:
        """Combine the triples in series order and evaluate π."""
        digits = int(options["digits"])
        # Without a prepared helper (a later `kiabatch results`), start one now: it works beside the combine.
        if prepared is None and digits > _HELPER_DIGITS:
            prepared = PiHelper(digits)
        ordered = sorted(results, key=lambda r: r.item["a"])
        expected = 0
        for result in ordered:
            if result.item["a"] != expected:
                raise ValueError(f"pi results do not cover the series: a gap at term {expected}")
            expected = result.item["b"]
        triples = []
        for result in ordered:
            try:
                triples.append(decode_triple(result.result))
            except ValueError as exc:
                raise ValueError(f"the result of task {result.index} is not a pi triple: {exc}") from None
        if isinstance(prepared, PiHelper):
            try:
                return reduce_with_helper(triples, digits, prepared)
            finally:
                prepared.abandon()  # used up: a later reduce computes alone or starts another
        _, q, t = combine_all(triples)
        return evaluate(q, t, digits, prepared)
