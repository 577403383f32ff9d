"""The π reduce's helper process (run as a file, not imported: it needs only gmpy2).

``python _pi_helper.py PRECISION`` computes R = floor(√10005 · 10^PRECISION) at once,
then answers requests on stdin until it closes. Every number travels as an 8-byte
big-endian length and that many bytes of big-endian magnitude (all are >= 0):

* ``R``: reply R.
* ``N`` EXCESS Q1 Q2 (EXCESS an 8-byte count): reply 426880 · R · ((Q1·Q2) >> EXCESS),
  the numerator of π's final division, so that the parent meanwhile computes the
  denominator on the other core.

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


def write_number(stream: BinaryIO, value: int) -> None:
    """One length-prefixed magnitude."""
    body = int(value).to_bytes((value.bit_length() + 7) // 8, "big")
    stream.write(len(body).to_bytes(8, "big") + body)
    stream.flush()


def main(argv: list[str]) -> int:
    precision = int(argv[1])
    root = isqrt(mpz(10005) * mpz(10) ** (2 * precision))
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while op := requests.read(1):
        if op == b"R":
            write_number(replies, root)
        elif op == b"N":
            excess = int.from_bytes(read_exactly(requests, 8), "big")
            q1, q2 = read_number(requests), read_number(requests)
            write_number(replies, 426880 * root * ((q1 * q2) >> excess))
        else:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
