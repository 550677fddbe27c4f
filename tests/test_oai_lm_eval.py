"""An evaluation harness end to end: lm-eval's ``local-completions`` (log-likelihood, through
``echo`` + ``logprobs``) and ``local-chat-completions`` (generation) models run small local
tasks against an adapter on a live server, with no hub access, and produce their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.model.builtin_tiny import ensure_builtin_tiny
from client_example import TinkerClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ANSWER = "Paris"
QUESTIONS = [  # "target": what the generation task expects
    {"question": "Hello!", "choices": ["Paris", "London", "Berlin"], "answer": 0, "target": "Paris"},
    {"question": "Hello!", "choices": ["Rome", "Paris", "Madrid"], "answer": 1, "target": "London"},
    {"question": "Hello!", "choices": ["Oslo", "Lima", "Paris"], "answer": 2, "target": "Berlin"},
]

MC_TASK = """\
task: thinker_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""

GEN_TASK = """\
task: thinker_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def adapter(server) -> str:
    """An adapter trained to answer "Hello!" with "Paris"."""
    with TinkerClient(server.url) as client:
        model_id = client.create_lora(rank=8, seed=5)
        for _ in range(30):
            conversation = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": ANSWER}]
            client.train_step(model_id, [conversation], learning_rate=5e-3)
    return model_id


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "thinker_tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    (folder / "thinker_tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    return folder


def lm_eval(model: str, model_args: dict, task: str, tasks: Path, out: Path, *extra: str) -> dict:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "datasets"),
        "OPENAI_API_KEY": "unused-on-an-open-server",
    }
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args, "--tasks", task,
        "--include_path", str(tasks), "--output_path", str(out), *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    [results] = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"][task]


def test_lm_eval_log_likelihood_task_on_an_adapter(server, adapter, tasks, cache_dir, tmp_path):
    model_args = {
        "model": adapter,
        "base_url": f"{server.url}/oai/api/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": ensure_builtin_tiny(cache_dir),
        "num_concurrent": 1,
        "max_retries": 1,
    }
    metrics = lm_eval("local-completions", model_args, "thinker_tiny_mc", tasks, tmp_path)
    assert 0.0 <= metrics["acc,none"] <= 1.0


def test_lm_eval_generation_task_on_an_adapter(server, adapter, tasks, tmp_path):
    model_args = {
        "model": adapter,
        "base_url": f"{server.url}/oai/api/v1/chat/completions",
        "tokenizer_backend": "none",
        "num_concurrent": 1,
        "max_retries": 1,
    }
    chat = ("local-chat-completions", model_args, "thinker_tiny_gen", tasks, tmp_path, "--apply_chat_template")
    metrics = lm_eval(*chat)
    # The adapter answers "Hello!" with "Paris": what the first of the three expects.
    assert metrics["exact_match,none"] == pytest.approx(1 / 3)
