"""The π reduce's helper process (run as a file, not imported: it needs only gmpy2).

``python _pi_helper.py PRECISION`` computes R = floor(√10005 · 10^PRECISION) at once,
writes ``!`` (the parent can see that R is ready without waiting), then answers
requests on stdin until it closes. Every number travels as an 8-byte big-endian
length and that many bytes of big-endian magnitude (all are >= 0):

* ``R``: reply R.
* ``N`` EXCESS Q1 Q2 (EXCESS an 8-byte count): reply NUM = 426880 · R · ((Q1·Q2) >> EXCESS),
  the numerator of π's final division (the parent meanwhile computes the
  denominator on the other core), and keep it.
* ``H`` HALF DEN (HALF an 8-byte count): reply HIGH = NUM // (DEN · 10^HALF) (computed
  from leading bits: very rarely one off, which the parent checks), then
  HIGH's decimal digits (ASCII): the high half of π's digits, converted here while
  the parent divides and converts the low half.

Private to :mod:`kiabatch.workloads.pi`, which falls back to doing the work itself
if this process fails in any way.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

try:
    from gmpy2 import isqrt, mpz
except ImportError:  # pragma: no cover - gmpy2 is a dependency; plain ints still give the right answer
    from math import isqrt

    mpz = int


def read_number(stream: BinaryIO) -> int:
    """One length-prefixed magnitude."""
    size = int.from_bytes(read_exactly(stream, 8), "big")
    return mpz(int.from_bytes(read_exactly(stream, size), "big"))


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the request ended early")
    return data


def framed(body: bytes) -> bytes:
    """``body`` after its 8-byte big-endian length (the parent frames its requests with this too)."""
    return len(body).to_bytes(8, "big") + body


def magnitude(value: int) -> bytes:
    """The big-endian bytes of ``value`` >= 0."""
    return int(value).to_bytes((value.bit_length() + 7) // 8, "big")


def write_number(stream: BinaryIO, value: int) -> None:
    """One length-prefixed magnitude."""
    write_bytes(stream, magnitude(value))


def write_bytes(stream: BinaryIO, body: bytes) -> None:
    """Length-prefixed bytes."""
    stream.write(framed(body))
    stream.flush()


def high_quotient(numerator: int, denominator: int, half: int) -> int:
    """About numerator // (denominator · 10^half): exact but, very rarely, one off.

    That is (numerator >> half) // (denominator · 5^half), and a quotient of n bits
    needs only the leading n + 64 bits of both: a division half as long as the full one.
    """
    numerator >>= half
    divisor = denominator * mpz(5) ** half
    quotient_bits = max(0, numerator.bit_length() - divisor.bit_length() + 1)
    cut = max(0, divisor.bit_length() - (quotient_bits + 64))
    return (numerator >> cut) // (divisor >> cut)


def main(argv: list[str]) -> int:
    sys.set_int_max_str_digits(0)  # without gmpy2, the digits go through Python's str(int)
    precision = int(argv[1])
    root = isqrt(mpz(10005) * mpz(10) ** (2 * precision))
    numerator = None
    # Buffered streams of our own: under PYTHONUNBUFFERED sys.stdout.buffer is a raw
    # file whose write(2) a signal can cut short, and the parent would read garbage.
    requests = open(sys.stdin.fileno(), "rb", closefd=False)  # noqa: SIM115 - lives as long as the process
    replies = open(sys.stdout.fileno(), "wb", closefd=False)  # noqa: SIM115
    replies.write(b"!")
    replies.flush()
    while op := requests.read(1):
        if op == b"R":
            write_number(replies, root)
        elif op == b"N":
            excess = int.from_bytes(read_exactly(requests, 8), "big")
            q1, q2 = read_number(requests), read_number(requests)
            numerator = 426880 * root * ((q1 * q2) >> excess)
            write_number(replies, numerator)
        elif op == b"H" and numerator is not None:
            half = int.from_bytes(read_exactly(requests, 8), "big")
            high = high_quotient(numerator, read_number(requests), half)
            write_number(replies, high)
            write_bytes(replies, str(high).encode())
        else:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
