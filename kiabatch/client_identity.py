"""How kiabatch's Redis connections name themselves (``CLIENT SETINFO``).

An operator's ``CLIENT LIST`` shows ``lib-name=redis-py(kiabatch_v0.1.0)``, as Redis's
client-identification guidance asks of libraries built on a client. Giving redis-py the
versions up front also spares every connection its ``importlib.metadata`` lookup of its
own version, a few milliseconds of each CLI start.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import redis

from ._version import __version__

UPSTREAM = "kiabatch"


@cache
def client_identity() -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` / ``ConnectionPool`` that identify kiabatch."""
    try:
        from redis import DriverInfo  # redis-py 7.2+; lib_name/lib_version are deprecated there
    except ImportError:
        return {"lib_name": f"redis-py({UPSTREAM}_v{__version__})", "lib_version": redis.__version__}
    return {"driver_info": DriverInfo(lib_version=redis.__version__).add_upstream_driver(UPSTREAM, __version__)}
