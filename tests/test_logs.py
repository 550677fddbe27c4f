"""Structured logs: request ids (taken from X-Request-Id or made up, echoed back), one access
line per request and one line per finished job naming the request, adapter and future, in
both formats, LOG_LEVEL; and, in process, the ids following a job onto its worker thread."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT
from thinker.obs import logs
from worker_pool import BatchLimits, WorkerPool

HELLO = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"}]


def out_of_vocabulary_request(model_id: str) -> bytes:
    """A Tinker forward_backward whose target token lies past the vocabulary: it passes the
    edge (tensor headers are sound) and fails in its job, as a user error."""
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 10**6], "weights": [1, 1]}
    )
    request = types.ForwardBackwardRequest(
        model_id=model_id, forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def post(server, path: str, body: dict, request_id: str | None = None) -> requests.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def run_job(server, path: str, body: dict, request_id: str) -> tuple[str, requests.Response]:
    """Submit under ``request_id`` and wait (the poll under an id of its own); (future id, answer)."""
    response = post(server, path, body, request_id)
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == request_id
    future_id = response.json()["request_id"]
    return future_id, post(server, "/retrieve_future", {"request_id": future_id, "timeout": 30}, f"poll-{request_id}")


@pytest.fixture(scope="module")
def json_server(start_server):
    return start_server(LOG_FORMAT="json", LOG_LEVEL="DEBUG", MAX_WORKERS="2")


@pytest.mark.e2e
@pytest.mark.slow
def test_json_lines_carry_request_adapter_and_future_ids(json_server):
    add_future, added = run_job(json_server, "/add_lora", {"base_model": "base", "rank": 4}, "req-add-1")
    adapter = added.json()["result"]["model_id"]
    fwd_future, _ = run_job(json_server, "/fwdbwd", {"model_id": adapter, "data": [HELLO]}, "req-fwd-2")
    response = requests.post(
        f"{json_server.url}/api/v1/forward_backward", data=out_of_vocabulary_request(adapter),
        headers={"X-Request-Id": "req-bad-3", "Content-Type": "application/x-protobuf"}, timeout=60,
    )
    assert response.status_code == 200, response.text
    bad_future = response.json()["request_id"]
    failed = post(json_server, "/retrieve_future", {"request_id": bad_future, "timeout": 30}, "poll-req-bad-3")
    assert failed.status_code == 500

    log = json_server.log_when('"status": "failed"')  # the failed job's line: the last to be written
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["message"] == "Base model loaded on cpu" for line in lines)  # start-up lines kept

    def one(**match) -> dict:
        found = [line for line in lines if match.items() <= line.items()]
        assert len(found) == 1, (match, found)
        return found[0]

    access = one(logger="thinker.access", request_id="req-add-1")
    assert (access["level"], access["method"], access["path"], access["status"]) == ("INFO", "POST", "/add_lora", 200)
    assert access["duration_ms"] >= 0
    job = one(logger="thinker.jobs", request_id="req-add-1")
    assert (job["kind"], job["status"], job["future_id"]) == ("add_lora", "completed", add_future)
    assert "adapter_id" not in job  # the adapter did not exist yet: the job ran in a queue of its own
    job = one(logger="thinker.jobs", request_id="req-fwd-2")
    assert (job["kind"], job["status"]) == ("fwdbwd", "completed")
    assert (job["adapter_id"], job["future_id"]) == (adapter, fwd_future)
    job = one(logger="thinker.jobs", request_id="req-bad-3")
    assert (job["future_id"], job["status"], job["level"]) == (bad_future, "failed", "INFO")
    assert "vocab" in job["error"] or "token ids must lie in" in job["error"]
    assert job["error_type"] == "BadRequestError" and job["duration_ms"] >= 0
    # Polls are logged at DEBUG (this server shows DEBUG).
    poll = one(logger="thinker.access", request_id="poll-req-fwd-2")
    assert (poll["level"], poll["path"]) == ("DEBUG", "/retrieve_future")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("given", ["bad id with spaces", "x" * 65, "-leading-dash", ""])
def test_an_unusable_client_id_is_replaced(json_server, given):
    response = requests.get(f"{json_server.url}/healthz", headers={"X-Request-Id": given}, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-Id"])


@pytest.mark.e2e
def test_text_format_appends_fields(server):
    """The shared server logs in the default format, at INFO."""
    add_future, added = run_job(server, "/add_lora", {"base_model": "base", "rank": 4}, "txt-add-1")
    adapter = added.json()["result"]["model_id"]
    fwd_future, _ = run_job(server, "/fwdbwd", {"model_id": adapter, "data": [HELLO]}, "txt-fwd-2")
    log = server.log_when(f"adapter_id={adapter} future_id={fwd_future}")  # the job's line: written last
    access = re.compile(
        r"^\[[^\]]+\] INFO request method=POST path=/fwdbwd status=200 duration_ms=[0-9.]+ request_id=txt-fwd-2$", re.M
    )
    assert access.search(log), log[-2000:]
    job = (
        "INFO job finished kind=fwdbwd status=completed duration_ms=",
        f" request_id=txt-fwd-2 adapter_id={adapter} future_id={fwd_future}\n",
    )
    assert re.search(re.escape(job[0]) + r"[0-9.]+" + re.escape(job[1]), log), log[-2000:]
    assert f"request_id=txt-add-1 future_id={add_future}" in log
    assert "request_id=poll-txt-fwd-2" not in log  # polls are DEBUG


@pytest.mark.unit
def test_log_level_warning_suppresses_info():
    """main()'s set-up (Config.from_env -> logs.configure), in a fresh interpreter: a whole
    server would cost ~10 s to show the same."""
    script = (
        "import logging; from thinker.obs import logs; from thinker.core.config import Config; "
        "logs.configure(Config.from_env().log_level); "
        "logging.getLogger('thinker.access').info('request'); logging.getLogger('thinker').debug('noise'); "
        "logging.getLogger('thinker').warning('loud')"
    )
    for level, shown in (("WARNING", ["loud"]), ("info", ["request", "loud"]), ("", ["request", "loud"])):
        env = {**os.environ, "LOG_LEVEL": level, "LOG_FORMAT": "json"}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["message"] for line in done.stderr.splitlines()] == shown, level


# ---- in process: the ids follow a job to the worker that runs it ------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(logs.ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler, logger = _Records(), logging.getLogger("thinker.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)


@pytest.mark.unit
def test_a_job_logs_with_the_ids_of_the_request_that_submitted_it(records):
    inside = logging.getLogger("thinker.test_logs")

    def runner(payloads: list) -> list:
        inside.info("fused pass of %d", len(payloads))
        return payloads

    pool = WorkerPool(2, runners={"g": runner}, limits=BatchLimits(window_s=0.0))
    token = logs.request_id.set("req-pool-1")
    try:
        plain = pool.submit("base_lora_aaa", "job", lambda: inside.info("plain job ran"))
        fused = pool.submit_many([("base_lora_bbb", "fwdbwd", "g", 1, 1, 4), ("base_lora_ccc", "fwdbwd", "g", 2, 1, 4)])
    finally:
        logs.request_id.reset(token)
    for future in (plain, *fused):
        assert future.wait(10) and future.meta["request_id"] == "req-pool-1"
    pool.shutdown()

    plain_record = next(r for r in records if r.getMessage() == "plain job ran")
    assert plain_record.threadName.startswith("thinker-worker")
    assert (plain_record.request_id, plain_record.adapter_id, plain_record.future_id) == (
        "req-pool-1", "base_lora_aaa", plain.id
    )
    pass_record = next(r for r in records if r.getMessage() == "fused pass of 2")  # one pass of both
    assert pass_record.adapter_id == "base_lora_bbb,base_lora_ccc"
    assert pass_record.future_id == f"{fused[0].id},{fused[1].id}" and pass_record.request_id == "req-pool-1"
    assert logs.request_id.get() is None and logs.adapter_id.get() is None  # nothing leaks out


@pytest.mark.unit
def test_formatters():
    record = logging.LogRecord("thinker.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.fields = {"status": 200, "error": 'said "no" twice'}
    record.request_id, record.adapter_id, record.future_id = "r1", None, "f1"
    text = logs.TextFormatter().format(record)
    assert text.endswith('INFO hello world status=200 error="said \\"no\\" twice" request_id=r1 future_id=f1')
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["logger"] == "thinker.x" and line["level"] == "INFO"
    assert (line["status"], line["request_id"], line["future_id"]) == (200, "r1", "f1") and "adapter_id" not in line
    assert line["time"].endswith("Z")
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.formatter("xml")


@pytest.mark.unit
def test_a_blocked_stderr_holds_up_no_job():
    """Records are written by a thread of their own: with stderr blocked (a pipe nobody reads,
    filled by one job's huge record), the other jobs still finish, and every record is written
    once the pipe drains. Written synchronously, the first blocked write would hold the
    handler's lock and every job's log line behind it."""
    script = """
import logging, sys
from thinker.obs import logs
from worker_pool import WorkerPool
logs.configure("INFO", "text")
pool = WorkerPool(2)
pool.on_finish(logs.log_job)
pool.submit("big", "test", lambda: logging.getLogger("thinker").info("x" * 1_000_000))
later = [pool.submit(f"a{i}", "test", lambda: 1) for i in range(8)]
done = sum(future.wait(20) for future in later)
print("done", done, flush=True)
pool.shutdown()
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()  # stderr is not read meanwhile: its pipe stays full
        assert line.strip() == "done 8"
        err = child.stderr.read()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
    assert "x" * 1_000_000 in err and err.count("job finished") == 9
