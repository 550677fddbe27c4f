"""Benchmark: one decode step of one row, against what the hardware allows.

A single sequence decoding reads every weight once per token, so its step is bound by memory
bandwidth. This prints, in process on the compute thread (--threads fixed, SmolLM2-135M with
random weights, a rank-8 adapter):

- our decode step (DecodeBatch.step on the slot cache) with the adapter, and on the base model;
- a plain transformers forward of one token with its own DynamicCache (no routing, no LoRA);
- every 2-D weight read once by ``linear`` on a one-row input: the floor, and the memory
  bandwidth it implies.

    python bench/bench_decode_step.py                # 2 threads
    python bench/bench_decode_step.py --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import time

import torch

from backend import SamplingParams
from backend.sample.decode import DecodeBatch
from backend.sample.sampling import SampleRow
from bench.bench import load

PROMPT = "Write a short poem about the sea."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", default="2", help="TORCH_THREADS for the compute thread (a number)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cache-dir", default="bench_results/models")
    args = parser.parse_args()
    backend = load(args.model, args.cache_dir, "cpu", sampler=False, torch_threads=args.threads)
    adapter = backend.add_lora(8, 16.0, None, 0)["model_id"]
    prompt = backend.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.steps + 10, temperature=1.0, stop_at_eos=False)

    def our_step(adapter_id: str | None) -> float:
        batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
        batch.admit([batch.make_row(SampleRow(adapter_id, prompt, params), backend.loaded.context_length)])
        for _ in range(3):
            batch.step()
        started = time.perf_counter()
        for _ in range(args.steps):
            batch.step()
        return (time.perf_counter() - started) / args.steps

    @torch.no_grad()
    def plain_step() -> float:
        out = backend.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(args.steps + 3):
            if i == 3:
                started = time.perf_counter()
            out = backend.model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - started) / args.steps

    @torch.no_grad()
    def weights_once() -> tuple[float, float]:
        weights = [p for p in backend.model.parameters() if p.dim() == 2]
        rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
        for w in weights:
            torch.nn.functional.linear(rows[w.shape[1]], w)
        started = time.perf_counter()
        for _ in range(10):
            for w in weights:
                torch.nn.functional.linear(rows[w.shape[1]], w)
        seconds = (time.perf_counter() - started) / 10
        return seconds, sum(w.numel() * w.element_size() for w in weights) / seconds / 1e9

    run = backend.compute.run
    print(f"{args.model}, fp32, one row, {run(torch.get_num_threads)} threads; ms per token:")
    print(f"  our step, rank-8 adapter:        {run(our_step, adapter) * 1000:.1f}")
    print(f"  our step, base model:            {run(our_step, None) * 1000:.1f}")
    print(f"  plain transformers forward:      {run(plain_step) * 1000:.1f}")
    seconds, gbps = run(weights_once)
    print(f"  every weight once (the floor):   {seconds * 1000:.1f}  ({gbps:.1f} GB/s)")
    backend.close()


if __name__ == "__main__":
    main()
