"""Fixtures: a fake API server with a Job emulator, and a kubeconfig pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.fake_cluster import FakeApiServer, JobEmulator

IMAGE = "test.example/kiabatch:dev"


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    server.store.namespaces.add("batch")
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("KIABATCH_IMAGE", IMAGE)
    yield server
    server.stop()


@pytest.fixture
def cluster(api: FakeApiServer) -> Iterator[FakeApiServer]:
    """The fake API server plus the emulator that runs its Jobs' pods."""
    emulator = JobEmulator(api, IMAGE)
    api.emulator = emulator
    yield api
    emulator.close()
