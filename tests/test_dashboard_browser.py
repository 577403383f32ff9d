"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against the dashboard on a
real embedded Redis. No browser is downloaded: Playwright starts /usr/bin/chromium (``.ci/run`` installs it).

The run also writes docs/dashboard.png, the README's screenshot.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from kiabatch import Batch, keys, submit
from kiabatch.batch import open_store
from tests.helpers import REPO, DashboardProcess, kb, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
HOSTILE_ITEMS = ["<script>window.pwned = 1</script>", '"><img src=x onerror="window.pwned = 2">',
                 "\x1b[31mred\x1b[0m", "</pre><script>window.pwned = 3</script>", "{{ 7 * 7 }}"]  # fmt: skip


@pytest.fixture
def embedded(home, monkeypatch):
    """The embedded Redis (no KIABATCH_REDIS_URL), shared by this test and the dashboard process."""
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.setenv("KIABATCH_EMBEDDED_IDLE_TIMEOUT", "30")
    return home


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="kb-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                                args=ARGS, viewport={"width": 1280, "height": 900},
                                                                accept_downloads=True)  # fmt: skip
        context.set_default_timeout(20_000)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def done_count(page, batch_id: str) -> int:
    return int(page.locator(f'tr[data-batch="{batch_id}"] .done-text').inner_text())


def test_the_batches_table_shows_a_running_batch_advancing_without_a_reload(embedded, browser):
    batch = submit(items=list(range(8)), command=["sh", "-c", "sleep 0.4"], parallel=1, wait=False, home=embedded)
    with DashboardProcess() as server:
        page = browser.new_page()
        page.goto(server.url)
        page.evaluate("window.sameDocument = 'yes'")
        wait_for(lambda: page.locator(f'tr[data-batch="{batch.id}"]').count() == 1, timeout=20)
        first = done_count(page, batch.id)
        assert first < 8
        wait_for(lambda: done_count(page, batch.id) > first, timeout=30, interval=0.2)
        assert page.evaluate("window.sameDocument") == "yes"  # updated in place: no reload
        assert page.evaluate("window.kiabatchRefreshes") >= 1
        wait_for(lambda: page.locator(f'tr[data-batch="{batch.id}"]').get_attribute("data-state") == "succeeded",
                 timeout=60, interval=0.2)  # fmt: skip
        # A finished batch's page stops updating.
        page.goto(f"{server.url}batches/{batch.id}")
        time.sleep(2.5)
        assert page.evaluate("window.kiabatchRefreshes || 0") == 0
        assert page.locator("#live").get_attribute("data-refresh") == "0"


def test_a_batch_page_shows_the_grid_a_failed_items_stderr_and_downloads_results(embedded, browser):
    script = (
        'printf "%s squared is %s" "$1" $(($1 * $1)); [ "$1" -ne 13 ] || {{ echo "BOOM-13 went wrong" >&2; exit 4; }}'
    )
    batch = submit(items=list(range(40)), command=["sh", "-c", script, "sh", "{item}"], parallel=4, retries=1,
                   wait=True, home=embedded)  # fmt: skip
    submit(items=list(range(6)), command=["true"], wait=True, home=embedded)
    with DashboardProcess() as server:
        page = browser.new_page()
        page.goto(f"{server.url}batches/{batch.id}")
        cells = page.locator("#grid .cell")
        assert cells.count() == 40
        assert page.locator('#grid .cell[data-state="failed"]').count() == 1
        # Indexes claim the next items in the order they start: find the one that ran item 13.
        failed_cell = page.locator('#grid .cell[data-state="failed"]')
        index = int(failed_cell.get_attribute("data-index"))
        assert failed_cell.get_attribute("data-attempts") == "2"
        assert page.locator('#grid .cell[data-state="done"]').count() == 39
        failed = page.locator("#failed tr.failed-item")
        assert failed.count() == 1 and "BOOM-13 went wrong" in failed.inner_text()
        assert "13 squared is 169" not in failed.inner_text()
        assert "2 squared is 4" in page.locator("#results").inner_text()
        assert "p50" in page.locator("#durations").inner_text()
        page.screenshot(path=str(REPO / "docs" / "dashboard.png"), full_page=False)
        with page.expect_download() as info:
            page.click("#download")
        lines = [json.loads(line) for line in Path(info.value.path()).read_text().splitlines()]
        assert len(lines) == 40 and [line["index"] for line in lines] == list(range(40))
        assert lines[index]["failed"] and lines[index]["item"] == 13 and lines[index]["stderr"].startswith("BOOM-13")
        failed_cell.click()
        assert "BOOM-13 went wrong" in page.locator("section.log").first.inner_text()


def test_hostile_items_results_and_logs_render_as_text(embedded, browser):
    script = 'printf "%s" "$1"; printf "%s\\n" "$1" >&2; case "$1" in *7*) printf "\\377\\376<b>";; esac'
    batch = submit(items=HOSTILE_ITEMS, command=["sh", "-c", script, "sh", "{item}"], wait=True, home=embedded)
    with DashboardProcess() as server:
        page = browser.new_page()
        for path in ("", f"batches/{batch.id}", *(f"batches/{batch.id}/logs?index={i}" for i in range(5))):
            page.goto(server.url + path)
            assert page.evaluate("typeof window.pwned") == "undefined", path
        page.goto(f"{server.url}batches/{batch.id}")
        results = page.locator("#results").inner_text()
        assert "<script>window.pwned = 1</script>" in results
        assert '"><img src=x onerror="window.pwned = 2">' in results
        assert "\\x1b[31mred\\x1b[0m" in results and "\x1b" not in results
        assert "{{ 7 * 7 }}" in results and "49" not in results
        assert "bytes, binary" in results  # invalid UTF-8 is not decoded into markup
        assert page.locator("#results img").count() == 0 and page.locator("#live script").count() == 0
        page.goto(f"{server.url}batches/{batch.id}/logs?index=3")
        assert "</pre><script>window.pwned = 3</script>" in page.locator("section.log").inner_text()


def test_no_action_buttons_without_allow_actions(embedded, browser):
    batch = submit(items=[1], command=["true"], wait=True, home=embedded)
    kb("schedule", "create", "nightly", "--cron", "0 3 * * *", "--item", "1", "-c", "true")
    with DashboardProcess() as server:
        page = browser.new_page()
        page.goto(f"{server.url}batches/{batch.id}")
        assert page.locator("#actions").count() == 0 and page.locator("button").count() == 0
        assert page.locator("#mode").inner_text() == "read-only"
        page.goto(f"{server.url}schedules")
        assert page.locator("button").count() == 0 and "nightly" in page.locator("#schedules").inner_text()


def test_each_action_works_with_allow_actions(embedded, browser):
    store = open_store()
    slow = submit(items=list(range(30)), command=["sleep", "1"], parallel=1, wait=False, home=embedded)
    stopped = submit(items=["a", "b"], command=["echo", "{item}"], start=False, home=embedded)
    doomed = submit(items=[1], command=["true"], wait=True, home=embedded)
    kb("schedule", "create", "nightly", "--cron", "0 3 * * *", "--item", "1", "-c", "true")
    with DashboardProcess("--allow-actions") as server:
        page = browser.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        assert page.goto(server.url).ok and page.locator("#mode").inner_text() == "actions allowed"
        # scale a running batch
        page.goto(f"{server.url}batches/{slow.id}")
        page.fill("#parallel", "3")
        page.click("#scale")
        assert "parallelism 3" in page.locator("#notice").inner_text()
        assert store.meta(slow.id)["parallelism"] == "3"
        # resume a batch that never ran: it finishes
        page.goto(f"{server.url}batches/{stopped.id}")
        page.click("#resume")
        assert "resumed" in page.locator("#notice").inner_text()
        wait_for(lambda: Batch(stopped.id).status().state == "succeeded", timeout=60)
        # delete (after the confirmation dialog)
        page.goto(f"{server.url}batches/{doomed.id}")
        page.click("#delete")
        page.wait_for_url(f"{server.url}?done=*")
        assert not store.exists(doomed.id) and page.locator(f'tr[data-batch="{doomed.id}"]').count() == 0
        # suspend and resume a schedule
        page.goto(f"{server.url}schedules")
        page.click('tr[data-schedule="nightly"] button')
        assert json.loads(store.redis.hget(keys.SCHEDULES, "nightly"))["suspend"] is True
        assert page.locator('tr[data-schedule="nightly"] .suspended').inner_text() == "yes"
        page.click('tr[data-schedule="nightly"] button')
        assert json.loads(store.redis.hget(keys.SCHEDULES, "nightly"))["suspend"] is False
        Batch(slow.id).delete()
