"""Redis restarts (graceful, or SIGKILL with the last second of writes lost) never lose or double an item."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from kiabatch import submit
from tests.helpers import RedisProcess

WORKER = str(Path(__file__).parent / "programs" / "worker.py")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_batch_survives_its_redis_restarting_mid_batch(tmp_path, home, monkeypatch, how):
    server = RedisProcess(tmp_path / "redis")
    # everysec: a SIGKILL loses up to a second of acknowledged writes (claims, reports).
    server.start("--appendfsync", "everysec")
    monkeypatch.setenv("KIABATCH_REDIS_URL", server.url)
    monkeypatch.setenv("KIABATCH_REDIS_RETRY_SECONDS", "30")
    log = tmp_path / "log"
    items = [str(i) for i in range(30)]

    def restart() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 16):
            time.sleep(0.01)
        server.stop(how)
        time.sleep(1.0)
        server.start("--appendfsync", "everysec")

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        batch = submit(
            items=items,
            command=[sys.executable, WORKER, "{item}", "--sleep", "0.1", "--log", str(log)],
            parallel=2,
            retries=3,
            wait=True,
            home=home,
        )
        thread.join()
        results = batch.results()
        assert sorted(r.item for r in results) == sorted(items)  # each item exactly once
        assert all(r.text == f"done {r.item}\n" for r in results)
        assert batch.failed() == []
        status = batch.status()
        assert status.state == "succeeded" and status.progress.done == 30 and status.progress.running == 0
    finally:
        thread.join()
        server.stop()
