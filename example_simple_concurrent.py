"""Simple concurrent multi-user example: three users fine-tune their own adapters at once.

Alice, Bob and Carol each run in a thread with their own TinkerClient: create a LoRA adapter,
train it for a few steps on a one-line conversation of their own, then sample from it. Because
every user has a separate adapter, the server can run their jobs side by side on one base model.

    python example_simple_concurrent.py [--url http://localhost:8000]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from client_example import TinkerClient, default_base_url
from errors import ThinkerError

USERS = ("Alice", "Bob", "Carol")
NUM_STEPS = 3
LEARNING_RATE = 5e-3

# Threads print concurrently; one lock keeps each line whole.
_print_lock = threading.Lock()


def say(user: str, message: str) -> None:
    with _print_lock:
        print(f"[{user}] {message}", flush=True)


@dataclass
class UserOutcome:
    """What one user's run produced; ``error`` is set when it failed."""

    name: str
    model_id: str | None = None
    sample: str | None = None
    error: str | None = None


def run_user(name: str, base_url: str) -> UserOutcome:
    """Create an adapter, train it, sample from it; never raises (failures land in ``error``)."""
    outcome = UserOutcome(name)
    client = TinkerClient(base_url)
    say(name, "Starting...")
    try:
        say(name, "Creating LoRA adapter...")
        outcome.model_id = client.create_lora(base_model="base", rank=8, alpha=16)
        say(name, f"✓ Created adapter: {outcome.model_id}")

        data = [
            [
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": f"Hi {name}!"},
            ]
        ]
        for step in range(1, NUM_STEPS + 1):
            result = client.train_step(outcome.model_id, data, learning_rate=LEARNING_RATE)
            say(name, f"Step {step}/{NUM_STEPS}: loss = {result['loss']:.4f}")

        say(name, "Sampling from adapter...")
        response = client.sample(outcome.model_id, ["Hello!"], max_tokens=20, temperature=0.7)
        outcome.sample = response["generated_text"]
        say(name, f"✓ Sample: {outcome.sample!r}")
    # Whatever goes wrong is this user's result to report; the other users carry on.
    except Exception as e:  # noqa: BLE001
        outcome.error = f"{type(e).__name__}: {e}"
        say(name, f"✗ Failed: {outcome.error}")
    finally:
        client.close()
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    args = parser.parse_args()

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
    with ThreadPoolExecutor(max_workers=len(USERS)) as pool:
        outcomes = list(pool.map(run_user, USERS, [args.url] * len(USERS)))
    elapsed = time.perf_counter() - start

    print()
    print("=" * 70)
    print("SUMMARY")
    print("=" * 70)
    print()
    failed = [o for o in outcomes if o.error]
    if not failed:
        print(f"✓ All {len(USERS)} users completed training!")
    else:
        print(f"✗ {len(failed)} of {len(USERS)} users failed:")
        for o in failed:
            print(f"  ✗ {o.name}: {o.error}")
    print(f"✓ Total time: {elapsed:.2f} seconds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
