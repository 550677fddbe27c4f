"""Load-test script: N concurrent users, each with their own LoRA adapter, against a live server.

Each user (user_0 .. user_{N-1}) creates an adapter, trains it for a few steps
(fwdbwd + optim_step) and samples from it, all at the same time. The script reports
successes, failures, per-user times and the concurrency speedup (sum of per-user times
over wall time), then a summary table (steps, first -> last loss, tokens, time, training
throughput per user). In a terminal a live bar per user (one for all past 12 users) shows
steps done and the latest loss. Exit status 1 if any user failed.

    python test_concurrent_users.py [N] [--steps 3] [--url http://localhost:8000]

This is a script, not a pytest module: it needs a running server (``python app.py``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from client_example import TinkerClient, default_base_url, url_or_exit
from errors import ThinkerError
from progress import UserProgress, UserRun, make_console, summary_table

LEARNING_RATE = 5e-3

# Threads print concurrently; one lock keeps each line whole.
_print_lock = threading.Lock()


def say(user_id: str, message: str) -> None:
    with _print_lock:
        print(f"[User {user_id}] {message}", flush=True)


def run_user(index: int, base_url: str, steps: int, bars: UserProgress) -> UserRun:
    """Create -> train -> sample for one user; never raises (failures land in ``error``)."""
    user_id = f"user_{index}"
    result = UserRun(user_id, steps)
    client = TinkerClient(base_url)
    start = time.perf_counter()
    try:
        say(user_id, "Creating LoRA adapter...")
        # Distinct seeds give each user a distinct starting adapter.
        result.model_id = client.create_lora(base_model="base", rank=8, alpha=16, seed=index)
        say(user_id, f"✓ Created adapter: {result.model_id}")

        data = [
            [
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": f"I am the assistant of {user_id}."},
            ]
        ]
        for step in range(1, steps + 1):
            say(user_id, f"Training step {step}/{steps}...")
            step_start = time.perf_counter()
            # Wait for the gradients before stepping: a failed fwdbwd must not be followed by a step.
            fwd = client.wait_for_result(client.fwdbwd(result.model_id, data))
            client.wait_for_result(client.optim_step(result.model_id, learning_rate=LEARNING_RATE))
            result.record_step(fwd, step_start, time.perf_counter())
            bars.step(user_id, fwd["loss"])
            say(user_id, f"Step {step}: loss = {fwd['loss']:.4f}")

        say(user_id, "Testing inference...")
        response = client.sample(result.model_id, ["Who are you?"], max_tokens=20, temperature=0.7)
        say(user_id, f"✓ Generated: {response['generated_text']!r}")
    # Whatever goes wrong is this user's result to report; the other users carry on.
    except Exception as e:  # noqa: BLE001
        result.error = f"{type(e).__name__}: {e}"
        bars.fail(user_id)
        say(user_id, f"✗ Failed: {result.error}")
    finally:
        client.close()
        result.elapsed = time.perf_counter() - start
    if not result.error:
        say(user_id, f"✓ Completed in {result.elapsed:.2f}s")
    return result


def print_summary(results: list[UserRun], wall: float) -> None:
    """The RESULTS SUMMARY block: counts, times, per-user details and speedup."""
    ok = [r for r in results if not r.error]
    print()
    print("=" * 80)
    print("RESULTS SUMMARY")
    print("=" * 80)
    print()
    print(f"Total users: {len(results)}")
    print(f"Successful: {len(ok)}")
    print(f"Failed: {len(results) - len(ok)}")
    print(f"Total elapsed time: {wall:.2f}s")
    if ok:
        print(f"Average time per user: {sum(r.elapsed for r in ok) / len(ok):.2f}s")
    else:
        print("Average time per user: n/a")
    print()
    print("Per-user details:")
    for r in results:
        if r.error:
            print(f"  ✗ {r.name}: {r.elapsed:.2f}s (error: {r.error})")
        else:
            print(f"  ✓ {r.name}: {r.elapsed:.2f}s (model: {r.model_id})")
    if ok:
        # Had the successful users run one after another, they would have taken this long.
        sequential = sum(r.elapsed for r in ok)
        print()
        print(f"Concurrency speedup: {sequential / wall:.2f}x")
        print(f"(Estimated sequential time: {sequential:.2f}s vs actual: {wall:.2f}s)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Load-test a thinker server with N concurrent users, each with its own adapter."
    )
    parser.add_argument("num_users", nargs="?", type=int, default=4, metavar="N", help="number of users (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per user (default 3)")
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    args = parser.parse_args()
    args.url = url_or_exit(args.url)
    if args.num_users < 1:
        parser.error("N must be at least 1")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    console = make_console()

    print("=" * 80)
    print(f"Testing {args.num_users} concurrent users with different LoRA adapters")
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
    names = [f"user_{i}" for i in range(args.num_users)]
    with UserProgress(console, names, args.steps) as bars, ThreadPoolExecutor(max_workers=args.num_users) as pool:
        futures = [pool.submit(run_user, i, args.url, args.steps, bars) for i in range(args.num_users)]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start

    print_summary(results, wall)
    print()
    console.print(summary_table(results, wall))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
