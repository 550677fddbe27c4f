"""TinkerClient: a small Python wrapper over the thinker REST API, plus a walkthrough.

The client owns the HTTP details: one ``requests.Session`` per client (connection reuse keeps
round trips cheap), mapping error responses back to the classes in ``thinker/core/errors.py``,
and waiting on futures by long-polling ``/retrieve_future`` so a result is seen the moment it
exists.

Run ``python client_example.py [--url URL]`` against a running server (``python app.py``) to
walk through the seed API (health, add_lora, fwdbwd, retrieve_future, optim_step, train_step,
sample, save_lora, and two deliberate errors) and print what comes back; it ends with a table
of the calls made, what each found and how long it took.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Self
from urllib.parse import urlsplit

import requests

from thinker.core.errors import (
    BadRequestError,
    NotFoundError,
    RequestFailedError,
    ThinkerError,
    error_from_response,
)
from thinker.obs.progress import Sections, make_console

DEFAULT_BASE_URL = "http://localhost:8000"

# The server caps a long-poll at 60 s; shorter slices keep us well clear of proxies and
# idle-connection timeouts while costing only one extra round trip per 30 s of waiting.
LONG_POLL_SLICE_S = 30.0

# Added to the long-poll time for the HTTP read timeout, so the server's own 202 arrives
# before requests gives up on the socket.
LONG_POLL_MARGIN_S = 10.0


# A TLS handshake against a plain-HTTP server gets no answer at all: waitress waits for a
# request line that never comes. The connect timeout (which covers the handshake) ends that.
CONNECT_TIMEOUT_S = 10.0


def default_base_url() -> str:
    """The server URL the scripts use unless ``--url`` is given: env ``BASE_URL`` or localhost."""
    return os.environ.get("BASE_URL") or DEFAULT_BASE_URL


def check_url(url: str) -> str:
    """``url`` without its trailing slash, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL {url!r} must start with http:// or https:// and name a host: {DEFAULT_BASE_URL}")
    return url.rstrip("/")


def url_or_exit(url: str) -> str:
    """For the scripts' ``--url``: a bad URL ends the script with one line and exit status 2."""
    try:
        return check_url(url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class TinkerClient:
    """Client for one thinker server.

    Asynchronous operations (``add_lora``, ``fwdbwd``, ``optim_step``, ``save_lora``) return a
    request id; pass it to ``wait_for_result`` (or ``retrieve_future``) to get the result.
    A ``requests.Session`` is not guaranteed thread-safe, so give each thread its own client.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0, api_key: str | None = None) -> None:
        """``api_key``: needed when the server has keys (default: $THINKER_API_KEY)."""
        self.base_url = check_url(base_url)
        self.timeout = timeout  # HTTP timeout for ordinary (non long-poll) calls, in seconds
        self.session = requests.Session()
        api_key = api_key or os.environ.get("THINKER_API_KEY")
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # ------------------------------------------------------------------ plumbing

    def _request(
        self, method: str, path: str, body: dict | None = None, timeout: float | None = None
    ) -> tuple[int, dict]:
        """Send one request; return (status, parsed JSON body) without judging the status."""
        url = f"{self.base_url}{path}"
        try:
            limit = timeout or self.timeout
            started = time.monotonic()
            resp = self.session.request(method, url, json=body, timeout=(min(CONNECT_TIMEOUT_S, limit), limit))
        except (requests.exceptions.SSLError, requests.Timeout) as e:
            # A timeout before the read limit ran out happened while connecting (TLS handshake included).
            if isinstance(e, requests.Timeout) and time.monotonic() - started >= limit:
                raise TimeoutError(f"{method} {path} got no answer within {limit}s") from e
            hint = " (is it a plain-HTTP server? try http://)" if self.base_url.startswith("https:") else ""
            raise ConnectionError(f"no answer from {self.base_url} while connecting{hint}") from e
        except requests.ConnectionError as e:
            raise ConnectionError(
                f"cannot connect: is the server running at {self.base_url}? start it with `python app.py`"
            ) from e
        try:
            data = resp.json()
        except ValueError:
            # A non-JSON body (a proxy's HTML error page, say) still deserves a readable error.
            data = {"error": resp.text.strip()[:200] or f"HTTP {resp.status_code}"}
        if not isinstance(data, dict):
            data = {"result": data}
        return resp.status_code, data

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """Send one request and raise the matching ThinkerError for any non-2xx answer."""
        status, data = self._request(method, path, body, timeout)
        if status >= 400:
            raise error_from_response(status, data)
        return data

    def _submit(self, path: str, body: dict) -> str:
        """POST an asynchronous operation and return its request id."""
        return self._call("POST", path, body)["request_id"]

    def close(self) -> None:
        """Release pooled connections."""
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoints

    def healthz(self) -> dict:
        """GET /healthz: server status, base model, device, worker count, adapter count."""
        return self._call("GET", "/healthz")

    def add_lora(
        self,
        base_model: str = "base",
        rank: int = 8,
        alpha: float = 16,
        target_modules: list[str] | None = None,
        seed: int | None = None,
    ) -> str:
        """Queue creation of a new LoRA adapter; the future's result holds its ``model_id``."""
        body: dict[str, Any] = {"base_model": base_model, "rank": rank, "alpha": alpha}
        if target_modules is not None:
            body["target_modules"] = list(target_modules)
        if seed is not None:
            body["seed"] = seed
        return self._submit("/add_lora", body)

    def fwdbwd(self, model_id: str, data: list[list[dict]], loss_fn: str = "cross_entropy") -> str:
        """Queue a forward-backward pass over ``data`` (a batch of chat conversations)."""
        return self._submit("/fwdbwd", {"model_id": model_id, "data": data, "loss_fn": loss_fn})

    def optim_step(self, model_id: str, adam_params: dict | None = None, learning_rate: float | None = None) -> str:
        """Queue an Adam step on the gradients accumulated by earlier ``fwdbwd`` calls.

        ``adam_params`` may carry learning_rate, beta1, beta2, eps and weight_decay;
        ``learning_rate`` overrides the one in it; the default learning rate is 1e-3.
        """
        params = dict(adam_params or {})
        if learning_rate is not None:
            params["learning_rate"] = learning_rate
        params.setdefault("learning_rate", 1e-3)
        return self._submit("/optim_step", {"model_id": model_id, "adam_params": params})

    def save_lora(self, model_id: str) -> str:
        """Queue writing the adapter to disk; the future's result holds the server-side ``path``."""
        return self._submit("/save_lora", {"model_id": model_id})

    def save_state(self, model_id: str, name: str | None = None) -> str:
        """Checkpoint weights + optimizer state; the result is ``{"path": "tinker://..."}``."""
        body = {"model_id": model_id} | ({"name": name} if name else {})
        return self._submit("/save_state", body)

    def load_state(self, path: str) -> str:
        """A new adapter from a checkpoint; the result is ``{"model_id", "path", "step"}``."""
        return self._submit("/load_state", {"path": path})

    def list_checkpoints(self) -> list[dict]:
        return self._call("GET", "/checkpoints")["checkpoints"]

    def delete_lora(self, model_id: str) -> str:
        """Remove an adapter once the jobs queued before this are done."""
        return self._submit("/delete_lora", {"model_id": model_id})

    def retrieve_future(self, request_id: str, timeout: float | None = None) -> dict:
        """Ask once for a future's state; never raises for a job that is merely unfinished.

        Returns ``{"status": "pending"}`` or ``{"status": "completed", "result": {...}}``.

        With ``timeout`` the server holds the request until the job finishes or the time runs out.
        Raises RequestFailedError if the job failed, NotFoundError for an unknown id.
        """
        body: dict[str, Any] = {"request_id": request_id}
        http_timeout = None
        if timeout is not None:
            body["timeout"] = timeout
            http_timeout = max(self.timeout, timeout + LONG_POLL_MARGIN_S)
        status, data = self._request("POST", "/retrieve_future", body, http_timeout)
        if status == 202:
            return {"status": "pending", **data}
        if data.get("status") == "failed":
            raise RequestFailedError(str(data.get("error") or f"request {request_id} failed"))
        if status >= 400:
            raise error_from_response(status, data)
        return data

    def wait_for_result(self, request_id: str, timeout: float = 300.0) -> dict:
        """Block until the future completes and return its result dict.

        Raises RequestFailedError if the job failed and TimeoutError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        backoff = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"request {request_id} not finished after {timeout}s")
            wait = min(LONG_POLL_SLICE_S, remaining)
            asked_at = time.monotonic()
            data = self.retrieve_future(request_id, timeout=wait)
            if data.get("status") != "pending":
                return data.get("result", {})
            # A server that ignores the long-poll answers 202 at once; back off rather than
            # spin on it. Against a long-polling server this branch never runs.
            if time.monotonic() - asked_at < wait / 2:
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 1.0)

    def sample(
        self,
        model_id: str,
        prompts: list[str],
        max_tokens: int = 50,
        temperature: float = 0.7,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> dict:
        """Generate from an adapter (or ``"base"``); synchronous. Returns the full response,
        ``{"generated_text": first output, "outputs": [one per prompt]}``."""
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        optional = {"top_p": top_p, "top_k": top_k, "seed": seed, "stop": stop}
        params.update({k: v for k, v in optional.items() if v is not None})
        body = {"model_id": model_id, "prompts": list(prompts), "sampling_params": params}
        return self._call("POST", "/api/v1/sample", body)

    # ------------------------------------------------------------------ conveniences

    def create_lora(
        self,
        base_model: str = "base",
        rank: int = 8,
        alpha: float = 16,
        target_modules: list[str] | None = None,
        seed: int | None = None,
        timeout: float = 300.0,
    ) -> str:
        """Create an adapter and wait for it; return its ``model_id``."""
        request_id = self.add_lora(base_model, rank, alpha, target_modules, seed)
        return self.wait_for_result(request_id, timeout)["model_id"]

    def train_step(
        self,
        model_id: str,
        data: list[list[dict]],
        learning_rate: float = 1e-3,
        timeout: float = 300.0,
    ) -> dict:
        """One forward-backward pass, then one optimizer step.

        Returns ``{"loss": ..., "step": ...}``.
        """
        # Wait for the gradients before stepping: a failed fwdbwd must not be followed by a step.
        loss = self.wait_for_result(self.fwdbwd(model_id, data), timeout)["loss"]
        step = self.wait_for_result(self.optim_step(model_id, learning_rate=learning_rate), timeout)
        return {"loss": loss, "step": step.get("step")}


# ---------------------------------------------------------------------- walkthrough


def walkthrough(client: TinkerClient, sections: Sections) -> None:
    """Call the seed API's training and sampling endpoints once each, printing what came back."""
    sections.start("GET /healthz")
    health = client.healthz()
    print(f"   {health}")
    sections.note(f"{health.get('base_model')} on {health.get('device')}")

    sections.start("POST /add_lora (rank=8, alpha=16)", call="POST /add_lora")
    request_id = client.add_lora(base_model="base", rank=8, alpha=16, seed=0)
    print(f"   request_id: {request_id}")
    result = client.wait_for_result(request_id)
    model_id = result["model_id"]
    print(f"   result: {result}")
    sections.note(model_id)

    conversation = [
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi! I was fine-tuned by thinker."},
        ]
    ]

    sections.start(f"POST /fwdbwd (model_id={model_id})", call="POST /fwdbwd")
    fwd_id = client.fwdbwd(model_id=model_id, data=conversation)
    print(f"   request_id: {fwd_id}")
    # One immediate, non-blocking look: usually still pending, since the job was just queued.
    print(f"   retrieve_future right away: {client.retrieve_future(fwd_id)}")
    fwd = client.wait_for_result(fwd_id)
    print(f"   wait_for_result: {fwd}")
    sections.note(f"loss {fwd['loss']:.4f}, {fwd.get('num_tokens')} tokens", loss=fwd["loss"])

    sections.start("POST /optim_step (learning_rate=1e-3)", call="POST /optim_step")
    step_id = client.optim_step(model_id, {"learning_rate": 1e-3})
    print(f"   request_id: {step_id}")
    sections.note(f"queued as {step_id}")

    sections.start("POST /retrieve_future (long-poll, timeout=30)", call="POST /retrieve_future (long-poll)")
    polled = client.retrieve_future(step_id, timeout=30)
    print(f"   {polled}")
    sections.note(f"{polled.get('status')}: step {polled.get('result', {}).get('step')}")

    sections.start("train_step: fwdbwd + optim_step together", call="train_step")
    trained = client.train_step(model_id, conversation, learning_rate=1e-3)
    print(f"   {trained}")
    sections.note(f"loss {trained['loss']:.4f}, step {trained['step']}", loss=trained["loss"])

    sections.start("POST /api/v1/sample (adapter, then base model)", call="POST /api/v1/sample")
    for target in (model_id, "base"):
        response = client.sample(target, ["Hello!"], max_tokens=30, temperature=0.7, seed=0)
        print(f"   {target}: {response['generated_text']!r}")
    sections.note("2 samples")

    sections.start("POST /save_lora")
    saved = client.wait_for_result(client.save_lora(model_id))
    print(f"   saved to: {saved['path']}")
    sections.note("saved " + "/".join(saved["path"].replace("\\", "/").split("/")[-2:]))

    sections.start("Intentional bad request: add_lora(rank=-1)", call="POST /add_lora (rank=-1)")
    try:
        client.add_lora(rank=-1)
        print("   ✗ the server accepted rank=-1")
        sections.note("accepted rank=-1", ok=False)
    except BadRequestError as e:
        print(f"   ✓ raised {type(e).__name__}: {e}")
        sections.note(f"raised {type(e).__name__}")

    sections.start(
        "Unknown request id: retrieve_future('future_doesnotexist')", call="POST /retrieve_future (unknown id)"
    )
    try:
        client.retrieve_future("future_doesnotexist")
        print("   ✗ the server knew this id")
        sections.note("the server knew this id", ok=False)
    except NotFoundError as e:
        print(f"   ✓ raised {type(e).__name__}: {e}")
        sections.note(f"raised {type(e).__name__}")


WALKTHROUGH_SECTIONS = 10


def main() -> int:
    parser = argparse.ArgumentParser(description="Walk through the seed API and print the results.")
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    args = parser.parse_args()
    console = make_console()

    client = TinkerClient(url_or_exit(args.url))
    print("=" * 70)
    print(f"TinkerClient walkthrough against {client.base_url}")
    print("=" * 70)
    error = None
    with Sections(console, WALKTHROUGH_SECTIONS) as sections:
        try:
            walkthrough(client, sections)
        except (ThinkerError, ConnectionError, TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"
            sections.fail(error)
        finally:
            client.close()
    if error:
        print(f"\n✗ {error}", file=sys.stderr)
    else:
        print("\n✓ Walkthrough complete")
    print()
    console.print(sections.table())
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
