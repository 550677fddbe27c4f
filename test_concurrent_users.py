"""Load-test script: N concurrent users, each with their own LoRA adapter, against a live server.

Each user (user_0 .. user_{N-1}) creates an adapter, trains it for a few steps
(fwdbwd + optim_step) and samples from it, all at the same time. The script reports
successes, failures, per-user times and the "concurrency speedup" of the seed script (the
sum of per-user times over the wall time: about N by construction whenever the users
overlap, however slow each one became), then a summary table (steps, first -> last loss,
tokens, time, training throughput per user). Then, unless --no-compare, it runs the same
work again one user at a time and prints the measured speedup: that wall time over the
concurrent one. In a terminal a live bar per user (one for all past 12 users) shows steps
done and the latest loss. Exit status 1 if any user failed.

    python test_concurrent_users.py [N] [--steps 3] [--url http://localhost:8000] [--no-compare]

This is a script, not a pytest module: it needs a running server (``python app.py``).
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

LEARNING_RATE = 5e-3

# Threads print concurrently; one lock keeps each line whole.
_print_lock = threading.Lock()


def say(user_id: str, message: str) -> None:
    with _print_lock:
        print(f"[User {user_id}] {message}", flush=True)


def run_user(index: int, base_url: str, steps: int, bars: UserProgress, quiet: bool = False) -> UserRun:
    """Create -> train -> sample for one user; never raises (failures land in ``error``).
    ``quiet``: no per-step lines (the comparison pass)."""
    user_id = f"user_{index}"
    report = (lambda _user, _message: None) if quiet else say
    result = UserRun(user_id, steps)
    client = TinkerClient(base_url)
    start = time.perf_counter()
    try:
        report(user_id, "Creating LoRA adapter...")
        # Distinct seeds give each user a distinct starting adapter.
        result.model_id = client.create_lora(base_model="base", rank=8, alpha=16, seed=index)
        report(user_id, f"✓ Created adapter: {result.model_id}")

        data = [
            [
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": f"I am the assistant of {user_id}."},
            ]
        ]
        for step in range(1, steps + 1):
            report(user_id, f"Training step {step}/{steps}...")
            step_start = time.perf_counter()
            # Wait for the gradients before stepping: a failed fwdbwd must not be followed by a step.
            fwd = client.wait_for_result(client.fwdbwd(result.model_id, data))
            client.wait_for_result(client.optim_step(result.model_id, learning_rate=LEARNING_RATE))
            result.record_step(fwd, step_start, time.perf_counter())
            bars.step(user_id, fwd["loss"])
            report(user_id, f"Step {step}: loss = {fwd['loss']:.4f}")

        report(user_id, "Testing inference...")
        response = client.sample(result.model_id, ["Who are you?"], max_tokens=20, temperature=0.7)
        report(user_id, f"✓ Generated: {response['generated_text']!r}")
    # Whatever goes wrong is this user's result to report; the other users carry on.
    except Exception as e:  # noqa: BLE001
        result.error = f"{type(e).__name__}: {e}"
        bars.fail(user_id)
        report(user_id, f"✗ Failed: {result.error}")
    finally:
        client.close()
        result.elapsed = time.perf_counter() - start
    if not result.error:
        report(user_id, f"✓ Completed in {result.elapsed:.2f}s")
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
        print("(that is the sum of per-user times / wall time: about N whenever the users overlap,")
        print(" however slow each became; the one-at-a-time run below measures the real speedup)")


def run_one_at_a_time(args: argparse.Namespace, console) -> tuple[list[UserRun], float]:
    """The same users' work (same seeds, fresh adapters), one user after another."""
    names = [f"user_{i}" for i in range(args.num_users)]
    start = time.perf_counter()
    with UserProgress(console, names, args.steps) as bars:
        results = [run_user(i, args.url, args.steps, bars, quiet=True) for i in range(args.num_users)]
    return results, time.perf_counter() - start


def print_comparison(concurrent_wall: float, results: list[UserRun], wall: float) -> None:
    """Each user's time alone, then the concurrent wall time against the one-at-a-time one."""
    for r in results:
        mark, error = ("✗", f" (error: {r.error})") if r.error else ("✓", "")
        print(f"  {mark} {r.name} alone: {r.elapsed:.2f}s{error}")
    print()
    print(
        f"Measured: concurrent wall {concurrent_wall:.2f} s vs one-at-a-time {wall:.2f} s: "
        f"speedup {wall / concurrent_wall:.2f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Load-test a thinker server with N concurrent users, each with its own adapter."
    )
    parser.add_argument("num_users", nargs="?", type=int, default=4, metavar="N", help="number of users (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per user (default 3)")
    parser.add_argument("--url", default=default_base_url(), help="server URL (default: $BASE_URL or %(default)s)")
    parser.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=True,
        help="then run the same work one user at a time and print the measured speedup (default: on)",
    )
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
    if args.compare:
        print()
        print(f"The same work one user at a time, for comparison ({args.num_users} users)...")
        alone, alone_wall = run_one_at_a_time(args, console)
        print_comparison(wall, alone, alone_wall)
        results += alone
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
