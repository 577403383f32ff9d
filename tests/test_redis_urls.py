"""Any Redis >= 6.2 works through --redis-url: TCP with a password, TLS, unix sockets, Redis 7."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from kiabatch import Batch, submit
from kiabatch.connection import connect
from kiabatch.errors import UnreachableError
from tests.helpers import free_port, run_cli

DEBIAN_REDIS = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
needs_debian_redis = pytest.mark.skipif(DEBIAN_REDIS is None, reason="Debian's redis-server (7.x) is not installed")


def start(binary: str, directory: Path, *args: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--logfile",
            str(directory / "log"),
            *args,
        ]
    )
    return process


def wait_ready(client: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis did not start")


@pytest.fixture
def password_redis(tmp_path):
    from kiabatch.embedded import redis_server_binary

    port = free_port()
    process = start(str(redis_server_binary()), tmp_path / "pw", "--port", str(port), "--requirepass", "s3cr3t")
    wait_ready(redis.Redis(port=port, password="s3cr3t"))
    yield port
    process.terminate()
    process.wait()


def test_a_password_protected_redis_over_tcp(password_redis, home):
    url = f"redis://:s3cr3t@127.0.0.1:{password_redis}/2"
    batch = submit(items=[1, 2], command=["echo", "{item}"], redis=url, wait=True, home=home)
    assert sorted(r.text for r in batch.results()) == ["1\n", "2\n"]
    assert redis.Redis(port=password_redis, password="s3cr3t", db=2).exists(f"kiabatch:{{{batch.id}}}:meta")


def test_a_wrong_password_is_reported_without_printing_it(password_redis, home):
    with pytest.raises(UnreachableError, match="refused the credentials"):
        connect(f"redis://:wrong@127.0.0.1:{password_redis}/0")
    done = run_cli("--redis-url", f"redis://:hunter2@127.0.0.1:{password_redis}/0", "list")
    assert done.returncode == 3 and "hunter2" not in done.stderr and ":***@" in done.stderr


def test_a_detached_batch_reaches_the_same_password_protected_redis(password_redis, home):
    url = f"redis://:s3cr3t@127.0.0.1:{password_redis}/0"
    batch = submit(items=["a"], command=["echo", "{item}"], redis=url, wait=False, home=home)
    assert Batch(batch.id, url).wait(timeout=30).status().state == "succeeded"


def test_redis_older_than_6_2_is_refused(monkeypatch, password_redis):
    monkeypatch.setattr(redis.Redis, "info", lambda self, section=None: {"redis_version": "6.0.9"})
    with pytest.raises(UnreachableError, match=r"needs Redis 6\.2 or newer"):
        connect(f"redis://:s3cr3t@127.0.0.1:{password_redis}/0")


@needs_debian_redis
def test_redis_7_over_tls(tmp_path, home):
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=certs)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kiabatch-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )
    port = free_port()
    process = start(
        DEBIAN_REDIS,
        tmp_path / "tls",
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(certs / "server.crt"),
        "--tls-key-file",
        str(certs / "server.key"),
        "--tls-ca-cert-file",
        str(certs / "ca.crt"),
        "--tls-auth-clients",
        "no",
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
    try:
        wait_ready(redis.Redis.from_url(url))
        client = connect(url)
        assert client.info("server")["redis_version"].startswith("7.")
        batch = submit("pi", digits=50, parallel=2, redis=url, wait=True, home=home)
        assert batch.reduce().startswith("3.14159265358979323846")
        with pytest.raises(UnreachableError):
            connect(f"rediss://127.0.0.1:{port}/0")  # no CA: the self-signed chain is rejected
    finally:
        process.terminate()
        process.wait()


def test_kiabatch_connections_name_themselves_to_redis(redis_url, home):
    # CLIENT SETINFO (Redis 7.2+) shows lib-name=redis-py(kiabatch_v...) in an operator's CLIENT LIST.
    from kiabatch._version import __version__

    for client in (connect(redis_url), connect(home=home)):
        kwargs = client.connection_pool.connection_kwargs
        info = kwargs.get("driver_info")
        name = info.formatted_name if info is not None else kwargs["lib_name"]
        assert name == f"redis-py(kiabatch_v{__version__})"
        assert (info.lib_version if info is not None else kwargs["lib_version"]) == redis.__version__
