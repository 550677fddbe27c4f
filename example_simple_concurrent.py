"""Simple concurrent multi-user example: three users fine-tune their own adapters at once.

Alice, Bob and Carol each run in a thread with their own TinkerClient: create a LoRA adapter,
train it for a few steps on a one-line conversation of their own, then sample from it. Because
every user has a separate adapter, the server can run their jobs side by side on one base model.
In a terminal a live bar per user shows steps done and the latest loss; the run ends with a
summary table (steps, first -> last loss, tokens, time, throughput per user).

    python example_simple_concurrent.py [--url http://localhost:8000]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from client_example import TinkerClient, default_base_url, url_or_exit
from thinker.core.errors import ThinkerError
from thinker.obs.progress import UserProgress, UserRun, make_console, summary_table

USERS = ("Alice", "Bob", "Carol")
NUM_STEPS = 3
LEARNING_RATE = 5e-3

# Threads print concurrently; one lock keeps each line whole.
_print_lock = threading.Lock()


def say(user: str, message: str) -> None:
    with _print_lock:
        print(f"[{user}] {message}", flush=True)


def run_user(name: str, base_url: str, bars: UserProgress) -> UserRun:
    """Create an adapter, train it, sample from it; never raises (failures land in ``error``)."""
    run = UserRun(name, NUM_STEPS)
    client = TinkerClient(base_url)
    start = time.perf_counter()
    say(name, "Starting...")
    try:
        say(name, "Creating LoRA adapter...")
        run.model_id = client.create_lora(base_model="base", rank=8, alpha=16)
        say(name, f"✓ Created adapter: {run.model_id}")

        data = [
            [
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": f"Hi {name}!"},
            ]
        ]
        for step in range(1, NUM_STEPS + 1):
            step_start = time.perf_counter()
            # Wait for the gradients before stepping: a failed fwdbwd must not be followed by a step.
            fwd = client.wait_for_result(client.fwdbwd(run.model_id, data))
            client.wait_for_result(client.optim_step(run.model_id, learning_rate=LEARNING_RATE))
            run.record_step(fwd, step_start, time.perf_counter())
            bars.step(name, fwd["loss"])
            say(name, f"Step {step}/{NUM_STEPS}: loss = {fwd['loss']:.4f}")

        say(name, "Sampling from adapter...")
        response = client.sample(run.model_id, ["Hello!"], max_tokens=20, temperature=0.7)
        run.sample = response["generated_text"]
        say(name, f"✓ Sample: {run.sample!r}")
    # Whatever goes wrong is this user's result to report; the other users carry on.
    except Exception as e:  # noqa: BLE001
        run.error = f"{type(e).__name__}: {e}"
        bars.fail(name)
        say(name, f"✗ Failed: {run.error}")
    finally:
        client.close()
        run.elapsed = time.perf_counter() - start
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    args = parser.parse_args()
    args.url = url_or_exit(args.url)
    console = make_console()

    print("=" * 70)
    print("Simple Concurrent Multi-User Example")
    print("=" * 70)
    print()

    try:
        with TinkerClient(args.url) as client:
            health = client.healthz()
    except (ThinkerError, OSError) as e:  # unreachable or unhealthy: nothing else can work
        print(f"✗ Server check failed: {e}", file=sys.stderr)
        return 1
    print(f"✓ Server is healthy: {health}")
    print()
    print(f"Starting {len(USERS)} concurrent users...")
    print()

    start = time.perf_counter()
    with UserProgress(console, USERS, NUM_STEPS) as bars, ThreadPoolExecutor(max_workers=len(USERS)) as pool:
        runs = list(pool.map(run_user, USERS, [args.url] * len(USERS), [bars] * len(USERS)))
    elapsed = time.perf_counter() - start

    print()
    print("=" * 70)
    print("SUMMARY")
    print("=" * 70)
    print()
    failed = [r for r in runs if r.error]
    if not failed:
        print(f"✓ All {len(USERS)} users completed training!")
    else:
        print(f"✗ {len(failed)} of {len(USERS)} users failed:")
        for r in failed:
            print(f"  ✗ {r.name}: {r.error}")
    print(f"✓ Total time: {elapsed:.2f} seconds")
    print()
    console.print(summary_table(runs, elapsed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
