"""GET /metrics over HTTP: public even with API keys, every name ``thinker_``, parseable, and
the counters and histograms move by exactly what the training and sampling done reported."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from client_example import TinkerClient

KEY = "tml-metrics-0001"
HELLO = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there, friend!"}]
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def keyed(start_server):
    """A server of this module's own (so adapter counts are exact), with API keys on."""
    return start_server(THINKER_API_KEYS=KEY, MAX_WORKERS="2")


@pytest.fixture
def client(keyed):
    with TinkerClient(keyed.url, api_key=KEY) as c:
        yield c


def scrape(server) -> Samples:
    """Every sample of a keyless GET /metrics, by (name, labels)."""
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.e2e
@pytest.mark.slow
def test_public_prefixed_and_parseable(keyed):
    assert requests.get(f"{keyed.url}/adapters", timeout=10).status_code == 401  # keys are on
    samples = scrape(keyed)
    names = {name for name, _ in samples}
    assert names and all(name.startswith("thinker_") for name in names), sorted(names)
    info = next(dict(labels) for name, labels in samples if name == "thinker_build_info")
    assert (info["base_model"], info["device"], info["backend"]) == ("builtin-tiny", "cpu", "HF")
    for gauge in ("thinker_queue_depth", "thinker_jobs_running", "thinker_adapters_loaded", "thinker_workers"):
        assert gauge in names
    assert value(samples, "thinker_workers") == 2
    assert not any(name.startswith("thinker_accelerator_memory") for name in names)  # CPU: absent


@pytest.mark.e2e
@pytest.mark.slow
def test_training_and_sampling_move_the_counters(keyed, client):
    before = scrape(keyed)
    adapters = [client.create_lora(rank=4, seed=i) for i in range(2)]
    # Two requests per adapter, all queued at once: the pool may fuse them in any grouping.
    fwdbwd_ids = [client.fwdbwd(a, [HELLO] * (1 + i)) for i in range(2) for a in adapters]
    results = [client.wait_for_result(request_id, 60) for request_id in fwdbwd_ids]
    for a in adapters:
        client.wait_for_result(client.optim_step(a), 60)
    sampled = client.sample(adapters[0], ["Hi", "Hello"], max_tokens=8, temperature=1.0, seed=3)
    after = scrape(keyed)

    ok = {"method": "POST", "status": "200"}
    assert delta(before, after, "thinker_http_requests_total", endpoint="/add_lora", **ok) == 2
    assert delta(before, after, "thinker_http_requests_total", endpoint="/fwdbwd", **ok) == 4
    assert delta(before, after, "thinker_http_request_duration_seconds_count", endpoint="/fwdbwd", **ok) == 4
    assert delta(before, after, "thinker_http_requests_total", endpoint="/api/v1/sample", **ok) == 1

    for kind, n in (("add_lora", 2), ("fwdbwd", 4), ("optim_step", 2), ("sample", 1)):
        assert delta(before, after, "thinker_futures_finished_total", kind=kind, status="completed") == n, kind
        assert delta(before, after, "thinker_job_duration_seconds_count", kind=kind) == n, kind

    trained = sum(r["num_tokens"] for r in results)
    assert delta(before, after, "thinker_trained_tokens_total") == trained > 0
    assert delta(before, after, "thinker_sampled_tokens_total") == sum(sampled["num_tokens"]) > 0

    # Each fwdbwd ran in exactly one pass; a pass of n requests gave each of them batch_requests=n.
    passes = round(sum(1 / r["batch_requests"] for r in results))
    assert delta(before, after, "thinker_fused_batch_requests_sum", group="fwdbwd") == 4
    assert delta(before, after, "thinker_fused_batch_requests_count", group="fwdbwd") == passes
    assert delta(before, after, "thinker_fused_batch_tokens_count", group="fwdbwd") == passes
    assert delta(before, after, "thinker_fused_batch_tokens_sum", group="fwdbwd") >= trained  # padded
    assert delta(before, after, "thinker_fused_batch_requests_sum", group="optim_step") == 2

    assert value(after, "thinker_adapters_loaded") == 2 and value(after, "thinker_adapters_resident") == 2
    assert value(after, "thinker_queue_depth") == 0 and value(after, "thinker_jobs_running") == 0
    assert value(after, "thinker_futures_unfinished") == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_endpoint_label_is_the_url_rule_not_the_path(keyed, client):
    for run in ("run-a1b2c3", "run-d4e5f6"):
        requests.get(f"{keyed.url}/api/v1/training_runs/{run}", headers={"X-API-Key": KEY}, timeout=10)
    requests.get(f"{keyed.url}/no/such/page-123", headers={"X-API-Key": KEY}, timeout=10)
    requests.post(f"{keyed.url}/fwdbwd", json={}, timeout=10)  # no key: 401, counted under its rule
    samples = scrape(keyed)
    assert not any("run-a1b2c3" in v or "page-123" in v for _, labels in samples for _, v in labels)
    rule = {"endpoint": "/api/v1/training_runs/<run_id>", "method": "GET"}
    assert sum(v for (name, labels), v in samples.items()
               if name == "thinker_http_requests_total" and set(rule.items()) <= labels) == 2
    assert value(samples, "thinker_http_requests_total", endpoint="unmatched", method="GET", status="404") == 1
    assert value(samples, "thinker_http_requests_total", endpoint="/fwdbwd", method="POST", status="401") == 1


@pytest.mark.unit
def test_state_gauges_and_accelerator_memory(monkeypatch):
    """In process, with stand-ins: the scrape-time gauges, and the CUDA memory gauges (faked
    here; a CPU-only run never shows them)."""
    import torch

    from thinker.obs import metrics

    class Pool:
        def stats(self) -> dict:
            return {"queued": 3, "running": 2, "workers": 4}

        def pending_by_owner(self) -> dict:
            return {"user-a": 4, "user-b": 1}

    residency = SimpleNamespace(resident=2, offloads=5, reloads=4)
    backend = SimpleNamespace(adapters=[1, 2, 3], sampler=None, device=torch.device("cuda:0"), residency=residency)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2048)
    collected = list(metrics._StateCollector(SimpleNamespace(pool=Pool(), backend=backend)).collect())
    found = {s.name: (s.value, s.labels) for family in collected for s in family.samples}
    assert found["thinker_queue_depth"][0] == 3 and found["thinker_jobs_running"][0] == 2
    assert found["thinker_futures_unfinished"][0] == 5 and found["thinker_users_with_unfinished"][0] == 2
    assert found["thinker_adapters_loaded"][0] == 3 and found["thinker_adapters_resident"][0] == 2
    moves = {s.labels["direction"]: s.value for family in collected for s in family.samples
             if s.name == "thinker_adapter_moves_total"}
    assert moves == {"out": 5, "in": 4}
    assert found["thinker_accelerator_memory_allocated_bytes"] == (1000, {"device": "cuda:0"})
    assert found["thinker_accelerator_memory_reserved_bytes"] == (2048, {"device": "cuda:0"})
    assert metrics.sampled_tokens({"num_tokens": [3, 4]}) == 7
    assert metrics.sampled_tokens({"sequences": [{"tokens": [1, 2]}, {"tokens": [5]}]}) == 3
