"""The seed API's durable state endpoints: save_state, load_state, checkpoints, delete_lora."""

from __future__ import annotations

import pytest

from thinker.core.errors import BadRequestError, NotFoundError

pytestmark = pytest.mark.e2e

CHAT = [
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes!"}],
]


def step(client, model_id: str) -> float:
    loss = client.wait_for_result(client.fwdbwd(model_id=model_id, data=CHAT))["loss"]
    client.wait_for_result(client.optim_step(model_id, learning_rate=1e-2))
    return loss


def test_save_load_continue_and_delete(client):
    model_id = client.wait_for_result(client.add_lora(base_model="base", rank=4, alpha=8, seed=3))["model_id"]
    for _ in range(3):
        step(client, model_id)
    saved = client.wait_for_result(client.save_state(model_id, "three"))
    assert saved["path"] == f"tinker://{model_id}/weights/three"
    assert saved["path"] in [c["tinker_path"] for c in client.list_checkpoints()]

    loaded = client.wait_for_result(client.load_state(saved["path"]))
    copy = loaded["model_id"]
    assert copy != model_id and loaded["step"] == 3
    # Same weights and the same optimizer state: the next steps match exactly.
    greedy = {"prompts": ["Name a fruit."], "max_tokens": 8, "temperature": 0}
    assert client.sample(model_id=model_id, **greedy) == client.sample(model_id=copy, **greedy)
    for _ in range(2):
        assert step(client, model_id) == pytest.approx(step(client, copy), abs=1e-6)

    # Saving under a taken name fails the future; the adapter is unharmed.
    again = client.save_state(model_id, "three")
    with pytest.raises(Exception, match="already exists"):
        client.wait_for_result(again)

    deleted = client.wait_for_result(client.delete_lora(copy))
    assert deleted == {"model_id": copy, "deleted": True}
    with pytest.raises(NotFoundError):
        client.fwdbwd(model_id=copy, data=CHAT)
    with pytest.raises(NotFoundError):
        client.load_state(f"tinker://{model_id}/weights/none")


def test_bad_state_requests(client):
    with pytest.raises(BadRequestError, match="path"):
        client.load_state("/etc/passwd")
    with pytest.raises(BadRequestError, match="name"):
        model_id = client.wait_for_result(client.add_lora(base_model="base", rank=4, alpha=8))["model_id"]
        client.save_state(model_id, "../x")
