"""The dashboard as a real server process: /metrics parsed with prometheus_client's parser, read-only by
default, actions guarded by a form token and the origin, a bearer token, loopback Host names, Redis outages."""

from __future__ import annotations

import json
import socket
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kiabatch import Batch, Queue, submit
from kiabatch.store import Store
from tests.helpers import DashboardProcess, RedisProcess, kb, one_line_error, run_cli, wait_for

#: Hostile values for the serve options (tests/test_fuzz_cli.py fuzzes every other command the same way).
HUGE = ["999999999999999999999", "-1", "65536", "nan", "inf", "", " 7 ", "0x10", "1e308"]
TEXT = st.one_of(st.sampled_from(["x", "example.com", "256.1.1.1", "\x1b[31m", "\udcff", "a" * 300, "::g", "[", "-"]),
                 st.text(max_size=12))  # fmt: skip


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def metrics(server: DashboardProcess):
    code, headers, body = server.get("/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    return samples(body.decode())


def post(server: DashboardProcess, path: str, fields: dict[str, str], headers: dict[str, str] | None = None):
    data = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {}, method="POST")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.fixture
def dashboard(redis_url, home):
    with DashboardProcess() as server:
        yield server


def test_metrics_give_the_known_outcomes_of_a_batch(redis_url, home, client):
    before = submit(items=[1, 2], command=["true"], wait=True, home=home)  # counted before the server started
    with DashboardProcess() as server:
        script = "test {item} -ne 3 || exit 9; [ {item} -ne 4 ] || sleep 0.3"
        batch = submit(items=[1, 2, 3, 4], command=["sh", "-c", script], retries=1, wait=True, home=home)
        Queue("thumbs").enqueue_many(["a", "b"])
        assert kb("schedule", "create", "nightly", "--cron", "0 3 * * *", "--item", "1", "-c", "true").exit_code == 0
        found = metrics(server)
        Batch(batch.id).delete()  # the counters never go down when a batch goes
        after = metrics(server)
    assert value(after, "kiabatch_item_duration_seconds_count", workload="exec") == 5
    assert value(after, "kiabatch_dead_letter_items_total", workload="exec") == 1
    assert value(after, "kiabatch_batch_items", batch=batch.id, workload="exec") is None
    assert value(found, "kiabatch_up") == 1
    assert value(found, "kiabatch_batches", state="failed") == 1
    assert value(found, "kiabatch_batches", state="succeeded") == 1
    assert value(found, "kiabatch_batches", state="running") == 0
    labels = {"batch": batch.id, "workload": "exec"}
    assert value(found, "kiabatch_batch_items", **labels) == 4
    assert value(found, "kiabatch_items_total", **labels, state="done") == 3
    assert value(found, "kiabatch_items_total", **labels, state="failed") == 1
    assert value(found, "kiabatch_items_running", **labels) == 0
    assert value(found, "kiabatch_batch_info", **labels, backend="local", state="failed", schedule="") == 1
    # The histogram counts the 5 attempts reported while the server ran (not the 2 before).
    assert value(found, "kiabatch_item_duration_seconds_count", workload="exec") == 5
    assert value(found, "kiabatch_item_duration_seconds_bucket", workload="exec", le="+Inf") == 5
    assert value(found, "kiabatch_item_duration_seconds_bucket", workload="exec", le="0.25") <= 4  # the 0.3 s sleep
    assert value(found, "kiabatch_item_duration_seconds_sum", workload="exec") >= 0.3
    assert value(found, "kiabatch_retries_total", workload="exec") == 1  # item 3 failed twice: one retry
    assert value(found, "kiabatch_dead_letter_items_total", workload="exec") == 1
    assert value(found, "kiabatch_queue_items", queue="thumbs") == 2
    assert 0 <= value(found, "kiabatch_queue_oldest_item_age_seconds", queue="thumbs") < 60
    assert value(found, "kiabatch_schedule_suspended", schedule="nightly") == 0
    assert value(found, "kiabatch_schedule_next_run_timestamp_seconds", schedule="nightly") > 0
    assert value(found, "kiabatch_redis_used_memory_bytes") > 0
    assert value(found, "kiabatch_batch_items", batch=before.id, workload="exec") == 2


def test_finished_batches_leave_the_per_batch_series_after_the_retention(redis_url, home):
    batch = submit(items=[1], command=["true"], wait=True, home=home)
    with DashboardProcess("--metrics-retention", "0") as server:
        found = metrics(server)
    assert value(found, "kiabatch_batches", state="succeeded") == 1
    assert not [key for key in found if ("batch", batch.id) in key[1]]


def test_without_actions_no_route_writes_and_the_page_has_no_buttons(dashboard, home):
    batch = submit(items=[1], command=["true"], wait=True, home=home)
    code, _, page = dashboard.get(f"/batches/{batch.id}")
    assert code == 200 and b"<form" not in page and b"read-only" in page
    for action in ("delete", "resume", "scale"):
        assert post(dashboard, f"/batches/{batch.id}/{action}", {"parallel": "2"})[0] in (404, 405)
    assert Batch(batch.id).status().state == "succeeded"


def test_actions_need_the_form_token_and_the_same_origin(redis_url, home):
    batch = submit(items=[1], command=["true"], wait=True, home=home)
    with DashboardProcess("--allow-actions") as server:
        page = server.get(f"/batches/{batch.id}")[2].decode()
        token = page.split('name="csrf" value="')[1].split('"')[0]
        assert post(server, f"/batches/{batch.id}/delete", {})[0] == 403
        assert post(server, f"/batches/{batch.id}/delete", {"csrf": "guess"})[0] == 403
        evil = {"Origin": "http://evil.example"}
        assert post(server, f"/batches/{batch.id}/delete", {"csrf": token}, evil)[0] == 403
        assert Store(Batch(batch.id).store.redis).exists(batch.id)
        code, headers, _ = post(server, f"/batches/{batch.id}/delete", {"csrf": token}, {"Origin": server.url[:-1]})
        assert code == 303 and headers["location"].startswith("/?done=deleted")
        assert not Store(Batch(batch.id).store.redis).exists(batch.id)


def test_a_token_protects_every_route_but_healthz_and_is_never_shown(redis_url, home):
    with DashboardProcess(env={"KIABATCH_DASHBOARD_TOKEN": "s3cret-token-value"}) as server:
        assert server.get("/healthz")[0] == 200
        assert server.get("/metrics")[0] == 401
        assert server.get("/", {"Accept": "application/json"})[0] == 401
        code, _, body = server.get("/metrics", {"Authorization": "Bearer s3cret-token-value"})
        assert code == 200 and b"kiabatch_up 1.0" in body
        assert server.get("/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert post(server, "/login", {"token": "wrong"})[0] == 401
        code, headers, _ = post(server, "/login", {"token": "s3cret-token-value"})
        assert code == 303
        cookie = headers["set-cookie"].split(";")[0]
        assert "s3cret-token-value" not in cookie and "HttpOnly" in headers["set-cookie"]
        code, _, page = server.get("/", {"Cookie": cookie})
        assert code == 200 and b"s3cret-token-value" not in page
    assert "s3cret-token-value" not in server.stderr


def test_only_loopback_host_names_are_answered(dashboard):
    port = urllib.parse.urlsplit(dashboard.url).port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 421")
    assert dashboard.get("/healthz")[0] == 200


def test_every_answer_carries_a_strict_content_security_policy(dashboard):
    for path in ("/", "/queues", "/schedules", "/redis", "/metrics", "/batches/nope-x"):
        _, headers, _ = dashboard.get(path)
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff"
    assert dashboard.get("/batches/nope-x")[0] == 404
    assert dashboard.get("/batches/NOT_AN_ID")[0] == 400


def test_the_results_download_streams_every_outcome_as_json_lines(dashboard, home):
    batch = submit(items=["a", "<b>", "c"], command=["sh", "-c", 'printf %s "$1"; [ "$1" != c ]', "sh", "{item}"],
                   retries=0, wait=True, home=home)  # fmt: skip
    code, headers, body = dashboard.get(f"/batches/{batch.id}/results.jsonl")
    assert code == 200 and f'filename="{batch.id}-results.jsonl"' in headers["content-disposition"]
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [(line["item"], line["failed"]) for line in lines] == [("a", False), ("<b>", False), ("c", True)]
    assert lines[1]["result"] == "<b>"
    assert lines == [json.loads(line) for line in kb("-o", "json", "results", batch.id).stdout.splitlines()]


def test_a_redis_outage_shows_an_error_and_metrics_say_down_then_it_recovers(tmp_path, home):
    server = RedisProcess(tmp_path / "r").start()
    try:
        with DashboardProcess(env={"KIABATCH_REDIS_URL": server.url}) as dashboard:
            assert dashboard.get("/")[0] == 200
            server.stop()
            wait_for(lambda: dashboard.get("/")[0] == 503, timeout=10)  # the list's index is cached for 0.5 s
            code, _, page = dashboard.get("/")
            assert code == 503 and b"Redis" in page
            found = samples(dashboard.get("/metrics")[2].decode())
            assert value(found, "kiabatch_up") == 0
            server.start()
            wait_for(lambda: dashboard.get("/")[0] == 200, timeout=30)
    finally:
        server.stop()


def test_serve_refuses_bad_addresses_and_busy_ports_with_one_line(redis_url, home):
    one_line_error(run_cli("dashboard", "--host", "example.com"), 2, "bad --host")
    one_line_error(run_cli("dashboard", "--port", "70000"), 2, "70000")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        one_line_error(run_cli("dashboard", "--port", str(busy.getsockname()[1])), 2, "cannot listen")
    one_line_error(run_cli("--redis-url", "redis://127.0.0.1:1/0", "dashboard"), 3, "cannot reach")
    assert "render" in run_cli("dashboard", "--help").stdout


def test_the_list_pages_through_many_batches_and_the_grid_through_many_tasks(dashboard, home):
    for _ in range(52):
        submit(items=[1], command=["true"], start=False, home=home)
    big = submit(items=list(range(1001)), command=["true"], start=False, home=home)
    code, _, first = dashboard.get("/")
    assert code == 200 and b"page 1 of 2" in first and b"next" in first
    code, _, second = dashboard.get("/?page=1")
    assert code == 200 and b"page 2 of 2" in second and second.count(b"<tr data-batch=") == 3
    code, _, grid = dashboard.get(f"/batches/{big.id}?grid=1")
    assert code == 200 and grid.count(b'data-state="pending"') == 1 and b"page 2 of 2" in grid


def test_many_clients_at_once_while_a_batch_runs_all_get_answers(dashboard, home):
    from concurrent.futures import ThreadPoolExecutor

    batch = submit(items=list(range(20)), command=["sh", "-c", "sleep 0.05"], parallel=2, wait=False, home=home)
    paths = ["/", f"/batches/{batch.id}", f"/batches/{batch.id}?fragment=1", "/metrics", "/queues", "/redis",
             f"/batches/{batch.id}/results.jsonl"] * 12  # fmt: skip
    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(lambda path: dashboard.get(path)[0], paths))
    assert codes == [200] * len(paths)
    Batch(batch.id).wait(timeout=60)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    host=TEXT.filter(lambda text: text.strip("[]") not in ("localhost",) and not _is_ip(text)),
    port=st.one_of(st.sampled_from(HUGE), st.integers(-5, 70000).map(str)),
    extra=st.lists(st.sampled_from(["--open", "--allow-actions", "--metrics-retention", "--backend"]), max_size=2),
)
def test_serve_options_fuzzed_fail_with_one_line_and_never_serve(host, port, extra):
    """``dashboard serve`` is out of the CLI fuzz (it serves); here every invocation has a bad --host, so none
    serves: each must end with one error line and exit 2 or 3."""
    from click.testing import CliRunner

    from kiabatch.cli import cli

    args = ["dashboard", "--host", host, "--port", port]
    for flag in extra:
        args += [flag] if flag in ("--open", "--allow-actions") else [flag, "nan" if flag != "--backend" else host]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (2, 3), (args, result.output)
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiabatch: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr)


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_server_cleanly(redis_url, home, name):
    import signal

    server = DashboardProcess()
    assert server.get("/healthz")[0] == 200
    server.process.send_signal(getattr(signal, name))
    code = server.process.wait(timeout=15)
    server.stop()
    assert code == 0, (code, server.stderr)
    assert "Traceback" not in server.stderr
