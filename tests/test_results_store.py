"""Results that leave Redis: a real S3 server (SeaweedFS on 127.0.0.1) and local directories, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import obstore
import pytest

from kiabatch import Batch, Queue, submit
from kiabatch.keys import batch_keys
from kiabatch.results_store import ResultsStore, batch_prefix
from tests.helpers import S3_ACCESS_KEY, S3_SECRET_KEY, error_line, kb, one_line_error


def bucket_of(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[0]


def objects(s3_server, url: str) -> dict[str, bytes]:
    """Every object under the results URL, by key below it."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = s3_server.store(bucket)
    found = {}
    try:
        for page in obstore.list(store, prefix + "/"):
            for entry in page:
                found[entry["path"].removeprefix(prefix + "/")] = bytes(obstore.get(store, entry["path"]).bytes())
    except Exception as exc:  # a bucket nothing was written to yet does not exist
        if "NoSuchBucket" not in str(exc) and not isinstance(exc, FileNotFoundError):
            raise
    return found


def files_of(tmp_path: Path, blobs: dict[str, bytes]) -> list[str]:
    paths = []
    for name, data in blobs.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(str(path))
    return paths


@pytest.fixture
def blobs(tmp_path):
    """A large text result, a large binary one and a small one, as files a worker cats."""
    data = {
        "text.txt": ("line of text ✓\n" * 20_000).encode(),
        "binary.bin": os.urandom(300_000),
        "small.txt": b"tiny\n",
    }
    return data, files_of(tmp_path, data)


def test_large_text_and_binary_results_round_trip_through_s3_and_small_ones_stay_in_redis(
    redis_url, home, s3, s3_server, client, blobs
):
    data, paths = blobs
    batch = submit(items=paths, command=["cat", "{item}"], results_to=s3, wait=True, home=home)
    results = {Path(r.item).name: r for r in batch.results()}
    assert {name: r.result for name, r in results.items()} == data
    big, small = results["binary.bin"], results["small.txt"]
    assert small.ref is None and small.url is None and small.inline == b"tiny\n"
    assert big.inline == b"" and big.ref.size == 300_000
    assert big.ref.sha256 == hashlib.sha256(data["binary.bin"]).hexdigest()
    assert big.ref.content_type == "application/octet-stream"
    assert results["text.txt"].ref.content_type.startswith("text/plain")
    assert big.url == f"{s3}/{batch_prefix(batch.id, batch.store.spec(batch.id).created_at)}/{big.index}/0-1"
    with big.open() as stream:
        assert stream.read() == data["binary.bin"]
    # Redis holds only the references: the big results' bytes are in the bucket, once each.
    stored = objects(s3_server, s3)
    assert sorted(stored.values()) == sorted([data["text.txt"], data["binary.bin"]])
    assert max(len(v) for v in client.hvals(batch_keys(batch.id).results)) == len(b"tiny\n")


def test_every_output_file_is_uploaded_even_a_small_one_and_one_of_several_megabytes(
    redis_url, home, s3, s3_server, tmp_path
):
    big = os.urandom(6 * 1024 * 1024)
    paths = files_of(tmp_path, {"big.bin": big, "small.bin": b"\x00\x01"})
    batch = submit(items=paths, command=["cp", "{item}", "{output}"], results_to=s3, wait=True, home=home)
    results = {Path(r.item).name: r for r in batch.results()}
    assert all(r.ref is not None for r in results.values())
    assert results["big.bin"].read() == big and results["small.bin"].read() == b"\x00\x01"
    assert sorted(len(v) for v in objects(s3_server, s3).values()) == [2, len(big)]


def test_inline_limit_zero_stores_every_result_and_the_cli_shows_streams_and_downloads_them(
    redis_url, home, s3, s3_server, tmp_path, blobs
):
    data, paths = blobs
    done = kb("submit", "--results-to", s3, "--inline-limit", "0", "--batch-id", "stored", "--lines", "-",
              "--", "cat", "{item}", input="\n".join(paths))  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert len(objects(s3_server, s3)) == 3
    order = [Path(p).name for p in paths]
    raw = kb("results", "stored", "--raw")
    assert raw.exit_code == 0 and raw.stdout_bytes == b"".join(data[name] for name in order)
    shown = kb("results", "stored").stdout.splitlines()
    assert shown[2].endswith("\ttiny") and f"{s3}/stored/" in shown[1] and "application/octet-stream" in shown[1]
    lines = [json.loads(line) for line in kb("results", "stored", "--json").stdout.splitlines()]
    assert [line["sha256"] for line in lines] == [hashlib.sha256(data[n]).hexdigest() for n in order]
    assert all(line["url"].startswith(f"{s3}/stored/") for line in lines)
    target = tmp_path / "out"
    got = kb("results", "stored", "--download", str(target))
    assert got.exit_code == 0, got.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {str(i): data[n] for i, n in enumerate(order)}
    assert all(p.stat().st_mode & 0o077 == 0 for p in target.iterdir())


def test_download_names_files_after_a_field_and_refuses_unusable_or_repeated_names_before_writing(
    redis_url, home, s3, tmp_path
):
    items = [{"name": "a.png", "n": 1}, {"name": "b.png", "n": 2}]
    batch = submit(items=items, command=["echo", "{n}"], results_to=s3, inline_limit=0, wait=True, home=home)
    target = tmp_path / "named"
    assert kb("results", batch.id, "--download", str(target), "--name-from", "name").exit_code == 0
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.png": "1\n", "b.png": "2\n"}
    hostile = submit(items=[{"name": "../escape"}, {"name": "ok"}], command=["echo", "x"], wait=True, home=home)
    refused = kb("results", hostile.id, "--download", str(tmp_path / "h"), "--name-from", "name")
    one_line_error(refused, 2, "is not a file name")
    assert not (tmp_path / "h").exists() and not (tmp_path / "escape").exists()
    same = submit(items=[{"name": "x", "i": 1}, {"name": "x", "i": 2}], command=["echo", "{i}"], wait=True, home=home)
    one_line_error(kb("results", same.id, "--download", str(tmp_path / "s"), "--name-from", "name"), 2, "both")
    assert not (tmp_path / "s").exists()
    one_line_error(kb("results", same.id, "--name-from", "name"), 2, "--download")


def test_a_corrupted_object_is_caught_by_its_sha256_and_never_downloaded(redis_url, home, s3, s3_server, tmp_path):
    batch = submit(items=["a", "b"], command=["echo", "{item}"], results_to=s3, inline_limit=0, wait=True, home=home)
    first = batch.results()[0]
    bucket, _, prefix = s3.removeprefix("s3://").partition("/")
    obstore.put(s3_server.store(bucket), f"{prefix}/{first.ref.key}", b"b\n")  # same size, other bytes
    with pytest.raises(Exception, match="does not match its reference"):
        Batch(batch.id).results()[0].read()
    error_line(kb("results", batch.id), 3, "does not match its reference", "changed or corrupted")
    target = tmp_path / "dl"
    error_line(kb("results", batch.id, "--download", str(target)), 3, "does not match")
    assert not (target / "0").exists() and not any(p.name.startswith(".") for p in target.iterdir())


def test_delete_removes_the_batchs_objects_and_keep_results_keeps_them(redis_url, home, s3, s3_server):
    keep = submit(items=["k"], command=["echo", "{item}"], results_to=s3, inline_limit=0, wait=True, home=home)
    gone = submit(items=["g1", "g2"], command=["echo", "{item}"], results_to=s3, inline_limit=0, wait=True, home=home)
    assert len(objects(s3_server, s3)) == 3
    assert kb("delete", gone.id).exit_code == 0
    assert [key.split("/")[0] for key in objects(s3_server, s3)] == [keep.id]
    stopped = kb("delete", "--keep-results", keep.id)
    # It says what it did (it said "deleted batch", yet the batch stays listed with its results).
    assert stopped.exit_code == 0 and stopped.stderr.startswith(f"stopped batch {keep.id}; its results, status")
    assert len(objects(s3_server, s3)) == 1 and Batch(keep.id).results()[0].text == "k\n"
    assert Batch(keep.id).status().state == "succeeded"


def test_gc_removes_expired_batches_objects_and_losing_attempts_but_keeps_what_is_referenced(
    redis_url, home, s3, s3_server, client
):
    live = submit(items=["a", "b"], command=["echo", "{item}"], results_to=s3, inline_limit=0, wait=True, home=home)
    expired = submit(items=["c"], command=["echo", "{item}"], results_to=s3, inline_limit=0, wait=True, home=home)
    prefix = batch_prefix(live.id, live.store.spec(live.id).created_at)
    store = ResultsStore(s3, endpoint=s3_server.endpoint)
    store.put(f"{prefix}/0/0-7", b"an attempt that lost the report")
    store.put("not-kiabatch/readme.txt", b"someone else's object")
    for lookalike in ("docs/2023/01/5-2", "photos/2024/12/25-1", "x/1700000000000/1/2-3x"):
        store.put(lookalike, b"someone else's object, shaped like a result")
    client.delete(*batch_keys(expired.id).all())  # as its TTL would
    before = set(objects(s3_server, s3))
    dry = kb("gc", "--results-to", s3, "--dry-run")
    assert dry.exit_code == 0 and len(dry.stdout.splitlines()) == 2 and set(objects(s3_server, s3)) == before
    done = kb("gc", "--results-to", s3)
    assert done.exit_code == 0 and "removed 2" in done.stderr
    left = set(objects(s3_server, s3))
    assert left == {r.ref.key for r in live.results()} | {
        "not-kiabatch/readme.txt", "docs/2023/01/5-2", "photos/2024/12/25-1", "x/1700000000000/1/2-3x"
    }  # fmt: skip
    assert [r.text for r in live.results()] == ["a\n", "b\n"]


def test_results_in_a_local_directory_round_trip_and_the_directory_is_private(redis_url, home, tmp_path):
    root = tmp_path / "store" / "results"
    batch = submit(items=["x" * 100_000], command=["printf", "%s", "{item}"], results_to=f"file://{root}",
                   wait=True, home=home)  # fmt: skip
    [result] = batch.results()
    assert result.url.startswith(f"file://{root}/") and result.read() == b"x" * 100_000
    assert root.stat().st_mode & 0o077 == 0
    assert kb("delete", batch.id).exit_code == 0
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_a_queue_batch_stores_its_results_where_results_to_says(redis_url, home, tmp_path):
    root = tmp_path / "queued-results"
    queue = Queue("reports")
    queue.enqueue_many(["small", "y" * 5000])
    batch = queue.submit(["printf", "%s", "{item}"], results_to=f"file://{root}", inline_limit=1024, wait=True,
                         home=home)  # fmt: skip
    small, large = batch.results()
    assert small.url is None and small.result == b"small"  # under the limit: kept in Redis
    assert large.url.startswith(f"file://{root}/") and large.read() == b"y" * 5000


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://AK:SECRETVALUE@bucket/p", "credentials do not belong in the URL"),
        ("s3://ab/p", "the bucket must be"),
        ("s3://bucket/a//b", "empty"),
        ("s3://bucket/../x", "'..'"),
        ("http://bucket/p", "expected s3://"),
        ("file://relative/path", "expected s3://"),
        ("file:///tmp/x?y=1", "no query"),
        ("s3://bucket/p\n", "bad --results-to"),
    ],
)
def test_bad_results_urls_are_one_line_errors_that_write_nothing(redis_url, client, url, fragment):
    line = one_line_error(kb("submit", "--results-to", url, "--item", "1", "--", "true"), 2, fragment)
    assert "SECRETVALUE" not in line
    assert client.keys("*") == []


def test_an_endpoint_with_credentials_is_refused_without_repeating_them(redis_url, client):
    done = kb("submit", "--results-to", "s3://bucket/p", "--s3-endpoint-url", "http://ak:SECRETVALUE@127.0.0.1:9",
              "--item", "1", "--", "true")  # fmt: skip
    assert "SECRETVALUE" not in one_line_error(done, 2, "no path or credentials")
    assert client.keys("*") == []


def test_credentials_are_never_printed_nor_stored_even_when_the_store_refuses_them(
    redis_url, home, s3, s3_server, client, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-" + S3_SECRET_KEY)
    done = kb("submit", "--results-to", s3, "--inline-limit", "0", "--retries", "0", "--item", '"x"', "--",
              "echo", "{item}")  # fmt: skip
    assert done.exit_code == 1
    shown = done.stdout + done.stderr
    assert "cannot store the result" in shown and "SignatureDoesNotMatch" in shown
    [batch_id] = [key.decode().split("{")[1].split("}")[0] for key in client.keys("*:meta")]
    everything = shown + kb("-o", "json", "results", batch_id).stdout + kb("logs", batch_id).stdout
    everything += kb("status", batch_id).stdout + repr([client.dump(key) for key in client.keys("*")])
    for secret in (S3_SECRET_KEY, S3_ACCESS_KEY[4:]):
        assert secret not in everything


def test_download_names_that_look_like_its_temporary_files_or_fill_255_bytes_are_written_as_given(
    redis_url, home, tmp_path
):
    long_name = "日" * 85  # 255 bytes
    items = [{"name": ".x.kiabatch-partial", "v": 1}, {"name": "x", "v": 2}, {"name": long_name, "v": 3},
             {"name": ".kiabatch-abc.partial", "v": 4}]  # fmt: skip
    batch = submit(items=items, command=["echo", "{v}"], wait=True, home=home)
    target = tmp_path / "out"
    target.mkdir()
    (target / "already here").write_text("kept")
    assert kb("results", batch.id, "--download", str(target), "--name-from", "name").exit_code == 0
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        ".x.kiabatch-partial": "1\n", "x": "2\n", long_name: "3\n", ".kiabatch-abc.partial": "4\n",
        "already here": "kept",
    }  # fmt: skip


def test_a_download_into_a_directory_where_a_name_is_taken_by_a_directory_names_the_item(redis_url, home, tmp_path):
    batch = submit(items=[{"name": "x2", "v": 1}], command=["echo", "{v}"], wait=True, home=home)
    (tmp_path / "out" / "x2").mkdir(parents=True)
    refused = kb("results", batch.id, "--download", str(tmp_path / "out"), "--name-from", "name")
    one_line_error(refused, 2, "item 0:0", "x2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x2"]  # no temporary file left behind


def test_a_download_of_a_running_batch_writes_only_the_results_whose_names_it_checked(redis_url, home, tmp_path):
    gate = tmp_path / "go"
    items = [{"name": "a", "v": 0}, {"name": "b", "v": 1}, {"name": "a", "v": 2}]
    script = f"[ {{v}} -lt 2 ] || while [ ! -e {gate} ]; do sleep 0.05; done; echo {{v}}"
    batch = submit(items=items, command=["sh", "-c", script], parallel=3, wait=False, home=home)
    deadline = time.monotonic() + 30
    while batch.progress().done < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    checked = iter(batch.results())  # the first pass sees 2 results; the third finishes before the second
    first_pass = list(checked)
    assert len(first_pass) == 2
    from kiabatch.download import download_results

    passes = iter([first_pass, None])

    def results():
        current = next(passes)
        if current is not None:
            return current
        gate.touch()
        batch.wait(timeout=30)
        return batch.results()  # now three: item 2 is also named "a"

    written = download_results(results, tmp_path / "dl", name_from="name", chunked=False)
    assert written == 2
    assert {p.name: p.read_text() for p in (tmp_path / "dl").iterdir()} == {"a": "0\n", "b": "1\n"}
