"""Full-featured example: concurrent users training LoRA adapters, with coloured, timestamped logs.

Same flow as example_simple_concurrent.py (Alice, Bob and Carol each create an adapter, train
it and sample from it, all at once), but every line carries a millisecond timestamp and the
user's colour, so the interleaving of their requests on the server is easy to see. In a terminal
a live bar per user shows steps done and the latest loss. Ends with each user's loss per step
and a summary table (steps, first -> last loss, tokens, time, throughput per user).

    python example_concurrent_users.py [--steps 3] [--url http://localhost:8000]

Colour is off when stdout is not a terminal or NO_COLOR is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from client_example import TinkerClient, default_base_url, url_or_exit
from thinker.core.errors import ThinkerError
from thinker.obs.progress import UserProgress, UserRun, make_console, summary_table

LEARNING_RATE = 5e-3
RANK = 8
ALPHA = 16

# (name, ANSI colour, what the user teaches their adapter)
USERS = (
    ("Alice", "\033[94m", "Hi Alice! Ready to paint some watercolours?"),
    ("Bob", "\033[92m", "Hi Bob! Shall we tune the guitar first?"),
    ("Carol", "\033[93m", "Hi Carol! The telescope is set up for tonight."),
)
RESET = "\033[0m"

USE_COLOR = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

# Threads print concurrently; one lock keeps each line whole.
_print_lock = threading.Lock()


def log(name: str, color: str, message: str) -> None:
    """Print ``[HH:MM:SS.mmm] Name: message`` in the user's colour."""
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    line = f"[{stamp}] {name}: {message}"
    if USE_COLOR:
        line = f"{color}{line}{RESET}"
    with _print_lock:
        print(line, flush=True)


def run_user(name: str, color: str, reply: str, base_url: str, steps: int, bars: UserProgress) -> UserRun:
    """Create, train and sample from one user's adapter; failures land in ``run.error``."""
    run = UserRun(name, steps)
    client = TinkerClient(base_url)
    start = time.perf_counter()
    try:
        log(name, color, f"Creating LoRA adapter (rank={RANK})...")
        run.model_id = client.create_lora(base_model="base", rank=RANK, alpha=ALPHA)
        log(name, color, f"✓ Adapter created: {run.model_id}")

        data = [[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": reply}]]
        for step in range(1, steps + 1):
            log(name, color, f"Step {step}: Starting forward-backward pass...")
            step_start = time.perf_counter()
            fwd = client.wait_for_result(client.fwdbwd(run.model_id, data))
            tokens = fwd.get("num_tokens", "?")
            log(name, color, f"Step {step}: Loss = {fwd['loss']:.4f} ({tokens} tokens)")
            log(name, color, f"Step {step}: Applying optimizer step (lr={LEARNING_RATE})...")
            step_id = client.optim_step(run.model_id, learning_rate=LEARNING_RATE)
            opt = client.wait_for_result(step_id)
            run.record_step(fwd, step_start, time.perf_counter())
            bars.step(name, fwd["loss"])
            log(name, color, f"Step {step}: ✓ Optimizer step {opt.get('step', step)} done")

        log(name, color, "Generating sample from trained adapter...")
        response = client.sample(run.model_id, ["Hello!"], max_tokens=30, temperature=0.7)
        run.sample = response["generated_text"]
        log(name, color, f"✓ Sample: {run.sample!r}")
    # Whatever goes wrong is this user's result to report; the other users carry on.
    except Exception as e:  # noqa: BLE001
        run.error = f"{type(e).__name__}: {e}"
        bars.fail(name)
        log(name, color, f"✗ Failed: {run.error}")
    finally:
        client.close()
        run.elapsed = time.perf_counter() - start
    if not run.error:
        log(name, color, f"✓ Finished in {run.elapsed:.2f}s")
    return run


def print_history(runs: list[UserRun], steps: int) -> None:
    """A table of loss per step per user, then each user's time."""
    name_w = max(len(r.name) for r in runs) + 2
    header = "User".ljust(name_w) + "".join(f"Step {i}".rjust(10) for i in range(1, steps + 1))
    print(header + "Time".rjust(10))
    print("-" * (len(header) + 10))
    for r in runs:
        cells = [f"{loss:.4f}" for loss in r.losses] + ["-"] * (steps - len(r.losses))
        row = r.name.ljust(name_w) + "".join(c.rjust(10) for c in cells)
        print(row + f"{r.elapsed:.2f}s".rjust(10) + ("  ✗ " + r.error if r.error else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per user")
    args = parser.parse_args()
    args.url = url_or_exit(args.url)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    console = make_console()

    print("=" * 80)
    print("Example: Multiple Concurrent Users Training LoRA Adapters")
    print("=" * 80)
    print()

    try:
        with TinkerClient(args.url) as client:
            client.healthz()
    except (ThinkerError, OSError) as e:  # unreachable or unhealthy: nothing else can work
        print(f"✗ Server check failed: {e}", file=sys.stderr)
        return 1
    print("✓ Server is healthy")
    print()

    start = time.perf_counter()
    names = [name for name, _, _ in USERS]
    with UserProgress(console, names, args.steps) as bars, ThreadPoolExecutor(max_workers=len(USERS)) as pool:
        futures = [
            pool.submit(run_user, name, color, reply, args.url, args.steps, bars) for name, color, reply in USERS
        ]
        runs = [f.result() for f in futures]
    elapsed = time.perf_counter() - start

    print()
    print("=" * 80)
    print("Training history (loss per step)")
    print("=" * 80)
    print()
    print_history(runs, args.steps)
    print()

    failed = [r for r in runs if r.error]
    sequential = sum(r.elapsed for r in runs)
    if failed:
        print(f"✗ {len(failed)} of {len(runs)} users failed: {', '.join(r.name for r in failed)}")
    else:
        print(f"✓ All {len(runs)} users completed training!")
    print(
        f"✓ Total time: {elapsed:.2f} seconds "
        f"(sum of per-user times: {sequential:.2f}s, speedup {sequential / elapsed:.2f}x)"
    )
    print()
    console.print(summary_table(runs, elapsed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
