"""The client walkthrough, the examples and the load-test script, run as a user would."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

# A frame of a live progress bar: "3/3 loss 7.7722 0:00:01".
PROGRESS_FRAME = re.compile(r"\d+/\d+ loss (-|\d+\.\d{4})")


def run_script(server, *args: str, via_env: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("COLUMNS", None)  # the scripts' own width for a log (120 columns)
    argv = [sys.executable, *args]
    if via_env:
        env["BASE_URL"] = server.url
    else:
        argv += ["--url", server.url]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def table_rows(out: str, title: str) -> dict[str, list[str]]:
    """The rows of the rich table titled ``title`` in ``out``, keyed by their first cell."""
    assert title in out, f"no table {title!r} in:\n{out}"
    rows: dict[str, list[str]] = {}
    for line in out[out.rindex(title) :].splitlines()[1:]:
        if line.startswith("└"):
            return rows
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            assert cells[0], f"a cell wrapped onto a second line: {line!r}"
            rows[cells[0]] = cells
    raise AssertionError(f"table {title!r} never ends:\n{out}")


def assert_plain_log(out: str) -> None:
    """Off a terminal: no escape codes and no progress frames, just lines and tables."""
    assert "\x1b" not in out and "\r" not in out
    assert not PROGRESS_FRAME.search(out), PROGRESS_FRAME.search(out).group()


def assert_user_row(row: list[str], steps: int, losses: list[float], model_id: str) -> None:
    """User | Steps | Loss first → last | Tokens | Time | Train tok/s | Adapter"""
    _, done, loss, tokens, elapsed, rate, adapter = row
    assert done == f"{steps}/{steps}"
    assert len(losses) == steps
    assert loss == f"{losses[0]:.4f} → {losses[-1]:.4f}"
    assert int(tokens) > 0 and int(rate) > 0
    assert re.fullmatch(r"\d+\.\d\ds", elapsed)
    assert adapter == f"✓ {model_id}"


@pytest.mark.e2e
def test_client_walkthrough(server):
    result = run_script(server, "client_example.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "raised BadRequestError" in out and "raised NotFoundError" in out
    assert_plain_log(out)
    rows = table_rows(out, "Walkthrough summary")
    assert list(rows) == [str(i) for i in range(1, 11)]
    assert all(row[2].startswith("✓") and re.fullmatch(r"\d+ ms", row[3]) for row in rows.values()), rows
    model_id = re.search(r"'model_id': '(base_lora_[0-9a-f]+)'", out).group(1)
    assert rows["2"][1:3] == ["POST /add_lora", f"✓ {model_id}"]
    fwd_loss = float(re.search(r"wait_for_result: \{'loss': ([0-9.]+)", out).group(1))
    assert rows["3"][2].startswith(f"✓ loss {fwd_loss:.4f}, ")
    assert rows["9"][2] == "✓ raised BadRequestError" and rows["10"][2] == "✓ raised NotFoundError"


@pytest.mark.e2e
def test_simple_concurrent_example(server):
    result = run_script(server, "example_simple_concurrent.py", via_env=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SUMMARY" in out and "✓ All 3 users completed training!" in out
    assert re.search(r"✓ Total time: \d+\.\d+ seconds", out)
    assert_plain_log(out)
    rows = table_rows(out, "Per-user summary")
    assert list(rows) == ["Alice", "Bob", "Carol", "all"]
    for name in ("Alice", "Bob", "Carol"):
        model_id = re.search(rf"\[{name}\] ✓ Created adapter: (base_lora_[0-9a-f]+)", out).group(1)
        losses = [float(x) for x in re.findall(rf"\[{name}\] Step \d/3: loss = ([0-9.]+)", out)]
        assert_user_row(rows[name], 3, losses, model_id)
    assert rows["all"][1] == "9/9" and rows["all"][-1] == "3/3 ok"
    assert int(rows["all"][3]) == sum(int(rows[n][3]) for n in ("Alice", "Bob", "Carol"))


@pytest.mark.e2e
def test_concurrent_users_example(server):
    result = run_script(server, "example_concurrent_users.py", "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"\[\d\d:\d\d:\d\d\.\d{3}\] Alice: ", out)
    assert "Step 2" in out
    assert_plain_log(out)  # NO_COLOR and no terminal: no colour codes either
    rows = table_rows(out, "Per-user summary")
    assert list(rows) == ["Alice", "Bob", "Carol", "all"]
    for name in ("Alice", "Bob", "Carol"):
        model_id = re.search(rf"{name}: ✓ Adapter created: (base_lora_[0-9a-f]+)", out).group(1)
        steps = re.findall(rf"{name}: Step \d: Loss = ([0-9.]+) \((\d+) tokens\)", out)
        assert_user_row(rows[name], 2, [float(loss) for loss, _ in steps], model_id)
        assert int(rows[name][3]) == sum(int(tokens) for _, tokens in steps)
    assert rows["all"][1] == "6/6" and rows["all"][-1] == "3/3 ok"


@pytest.mark.e2e
@pytest.mark.parametrize("users", ["3"])
def test_load_test_script(server, users):
    result = run_script(server, "test_concurrent_users.py", users, "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "RESULTS SUMMARY" in out and f"Total users: {users}" in out
    assert f"Successful: {users}" in out and "Failed: 0" in out
    details = re.findall(r"✓ (user_\d+): (\d+\.\d+s) \(model: (base_lora_[0-9a-f]+)\)", out)
    assert len(details) == int(users)
    assert re.search(r"Concurrency speedup: \d+\.\d+x", out)
    assert re.search(r"\(Estimated sequential time: \d+\.\d+s vs actual: \d+\.\d+s\)", out)
    assert_plain_log(out)
    rows = table_rows(out, "Per-user summary")
    assert list(rows) == [f"user_{i}" for i in range(int(users))] + ["all"]
    for user, elapsed, model_id in details:
        losses = [float(x) for x in re.findall(rf"\[User {user}\] Step \d: loss = ([0-9.]+)", out)]
        assert_user_row(rows[user], 2, losses, model_id)
        assert rows[user][4] == elapsed  # the same time as in "Per-user details"
    assert rows["all"][1] == f"{2 * int(users)}/{2 * int(users)}" and rows["all"][-1] == f"{users}/{users} ok"
    # The measured comparison: the same work one user at a time, timed against the concurrent run.
    wall = re.search(r"Total elapsed time: (\d+\.\d\d)s", out).group(1)
    alone = re.findall(r"✓ (user_\d+) alone: \d+\.\d\ds", out)
    assert alone == [f"user_{i}" for i in range(int(users))]
    measured = re.search(r"Measured: concurrent wall (\d+\.\d\d) s vs one-at-a-time (\d+\.\d\d) s: "
                         r"speedup (\d+\.\d\d)x", out)
    assert measured, out
    concurrent, one_at_a_time, speedup = measured.groups()
    assert concurrent == wall
    x, y = float(concurrent), float(one_at_a_time)
    rounding = 0.005 / x * (1 + y / x) + 0.005  # each figure is printed to 2 decimals
    assert float(speedup) == pytest.approx(y / x, abs=rounding)


def run_in_terminal(server, *args: str, timeout: float = 120.0) -> tuple[int, str]:
    """Run a script with a pseudo-terminal as its stdout; return (exit status, output)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    for name in ("NO_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, *args, "--url", server.url], cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the script exited and the terminal closed
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=10), b"".join(chunks).decode("utf-8", "replace")
    finally:
        proc.kill()
        os.close(master)


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_progress_bars_in_a_terminal(server):
    status, out = run_in_terminal(server, "example_simple_concurrent.py")
    assert status == 0, out
    assert "\x1b[" in out  # a terminal gets colour and cursor movement...
    assert PROGRESS_FRAME.search(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out))  # ...and the live bars
    assert "✓ All 3 users completed training!" in out and "Per-user summary" in out


@pytest.mark.unit
def test_bench_tables_agree():
    from bench import bench

    rows = [
        {
            "n": n,
            "train": {"sequential": 100.0 * n, "threads": 90.0 * n, "fused": 150.0 * n, "one_adapter": 160.0 * n},
            "sample": {"one_by_one": 10.0, "fused": 10.0 * n},
            "mfu": None,
        }
        for n in (1, 8)
    ]
    args = type("Args", (), {"batch": 1, "seq_len": 128, "rank": 8, "new_tokens": 32, "reps": 1})
    md = [line for line in bench.markdown({"m": rows}, {}, args).splitlines() if re.match(r"\| \d", line)]
    assert md[1] == "| 8 | 800 | 720 | 1200 | 1280 | 1.50x | 0.94 | 10.0 | 80.0 | 8.00x |"

    from rich.console import Console

    buffer = io.StringIO()
    Console(width=80, file=buffer).print(bench.rich_table("m", rows))
    lines = buffer.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80  # fits a narrow terminal unwrapped
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    assert [line.split() for line in lines[rule + 1 :]] == [row.strip("| ").split(" | ") for row in md]


TRAIN_LOG = re.compile(
    r"  train tok/s: sequential (\d+), threads (\d+), fused (\d+), one_adapter (\d+)"
    r" \| fused/sequential (\d+\.\d\d)x, fused/one-adapter (\d+\.\d\d)$",
    re.M,
)
SAMPLE_LOG = re.compile(r"  sample tok/s: one-by-one (\d+\.\d), fused (\d+\.\d) \((\d+\.\d\d)x\)$", re.M)


@pytest.mark.unit
@pytest.mark.slow
def test_bench_runs_and_its_tables_show_what_it_measured(cache_dir, tmp_path):
    """bench.py for real, as small as it goes: the markdown (printed and in bench.md) and the
    terminal table carry, per N, exactly the figures its log lines reported as measured."""
    out_dir = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "bench/bench.py", "--models", "builtin-tiny", "--users", "1,2", "--reps", "1",
         "--seq-len", "16",
         "--new-tokens", "4", "--no-http", "--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(out_dir)],
        cwd=ROOT, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    train, sample = TRAIN_LOG.findall(out), SAMPLE_LOG.findall(out)
    assert len(train) == len(sample) == 2, out
    measured = [[str(n), *t, *s] for n, t, s in zip((1, 2), train, sample, strict=True)]
    for row in measured:  # the ratios are of the figures shown (rounding aside)
        seq, _, fused, one, vs_seq, vs_one, s_one, s_fused, s_speedup = map(float, row[1:])
        assert float(vs_seq) == pytest.approx(fused / seq, rel=0.01, abs=0.01)
        assert float(vs_one) == pytest.approx(fused / one, rel=0.01, abs=0.01)
        assert float(s_speedup) == pytest.approx(s_fused / s_one, rel=0.02, abs=0.01)

    md = [line.strip("| ").split(" | ") for line in out.splitlines() if re.match(r"\| \d", line)]
    # N, sequential, threads, fused, one adapter, fused/seq, fused/one, sample 1-by-1, fused, speedup
    expected = [[*row[:5], row[5] + "x", row[6], row[7], row[8], row[9] + "x"] for row in measured]
    assert md == expected
    assert (out_dir / "bench.md").read_text().strip() in out  # the file is what was printed
    assert (out_dir / "bench.png").stat().st_size > 0

    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    terminal = [line.split() for line in lines[rule + 1 : rule + 3]]
    assert terminal == expected
    assert max(len(line.rstrip()) for line in lines[rule - 3 : rule + 3]) <= 80  # fits a narrow terminal


@pytest.mark.unit
def test_scripts_fail_clearly_without_a_server():
    result = subprocess.run(
        [sys.executable, "test_concurrent_users.py", "2", "--url", "http://127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "python app.py" in result.stdout + result.stderr


@pytest.mark.unit
@pytest.mark.slow
def test_bench_adapters(cache_dir, tmp_path):
    """bench_adapters.py on builtin-tiny: 40 adapters, 4 resident; the rest went out, and the
    5 moved-back ones came in."""
    result = subprocess.run(
        [sys.executable, "bench/bench_adapters.py", "--model", "builtin-tiny", "--adapters", "40", "--resident", "4",
         "--device", "cpu", "--cache-dir", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "THINKER_CACHE_DIR": str(cache_dir)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "40 adapters of rank 8 on builtin-tiny" in result.stdout
    assert re.search(r"adapters resident / offloads / reloads\s*│\s*4 / 41 / 5", result.stdout), result.stdout


STEP_LINE = re.compile(r"  \((a|b|c)\) [^:]+: (\d+\.\d{3}) s, (\d+) real tok/s, MFU (\d+\.\d)%$", re.M)
RATIOS = re.compile(r"  a/b = (\d+\.\d{3}) \(bar <= 1\.05\), c/a = (\d+\.\d{3}) \(bar >= 1\)$", re.M)
SCALE_ROW = re.compile(r"^\| (\d+) \| (\d+) \| (\d+\.\d{3}) \| (\d+\.\d{3}) \| (\d+\.\d\d)x \|", re.M)


def ratio_of_shown(ratio: str, top: str, bottom: str) -> bool:
    """Whether ``ratio`` (shown rounded) can be top / bottom, given that both were shown rounded."""
    def half(shown: str) -> float:  # half a unit of the last digit shown
        return 0.5 * 10 ** -len(shown.split(".")[1])

    r, t, b = float(ratio), float(top), float(bottom)
    lowest = (t - half(top)) / (b + half(bottom)) - half(ratio)
    return lowest <= r <= (t + half(top)) / max(b - half(bottom), 1e-9) + half(ratio)


@pytest.mark.unit
@pytest.mark.slow
def test_gpu_script_smoke_run_on_cpu(cache_dir, tmp_path):
    """bench/gpu.sh --device cpu --quick: the N sweep (bench_scale.py) and the fused-step bars
    (bench_fused.py, memory in fresh processes included) run, and what they print holds
    together: token counts of the lengths spread, ratios of the times shown, both files."""
    out_dir = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--device", "cpu", "--quick"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OUT": str(out_dir), "THINKER_CACHE_DIR": str(cache_dir)}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    rows = SCALE_ROW.findall(out)
    assert [(n, tokens) for n, tokens, *_ in rows] == [("1", "64"), ("4", "160")]  # 64; 16+32+48+64
    for _, _, fused, sequential, ratio in rows:
        assert ratio_of_shown(ratio, sequential, fused), (ratio, sequential, fused)
    scale_md = (out_dir / "scale.md").read_text().splitlines()
    assert len(SCALE_ROW.findall("\n".join(scale_md))) == 2 and all(line in out.splitlines() for line in scale_md)

    assert "lengths [32, 43, 53, 64]" in out
    assert "tokens: 192 real, 256 padded in one pass (1.33x)" in out
    steps = {mode: seconds for mode, seconds, _, _ in STEP_LINE.findall(out)}
    assert set(steps) == {"a", "b", "c"}
    for _, seconds, rate, _ in STEP_LINE.findall(out):
        assert ratio_of_shown(f"{rate}.0", "192.0", seconds), (rate, seconds)
    a_b, c_a = RATIOS.search(out).groups()
    assert ratio_of_shown(a_b, steps["a"], steps["b"]) and ratio_of_shown(c_a, steps["c"], steps["a"]), out
    assert re.search(r"optimizer: one step of 4 adapters \d+\.\d ms, of one \d+\.\d ms -> \d+\.\d\dx", out)
    saved = re.search(r"saved for backward: fused (\d+\.\d) MB, one adapter (\d+\.\d) MB -> fused/one (\d\.\d{3})", out)
    fused_mb, one_mb, ratio = map(float, saved.groups())
    assert fused_mb > 0 and one_mb > 0 and ratio == pytest.approx(fused_mb / one_mb, rel=0.05)
    assert "peak memory growth in the pass" in out and "load average" in out
    fused_md = (out_dir / "fused.md").read_text().splitlines()
    assert fused_md and all(line in out.splitlines() for line in fused_md)
