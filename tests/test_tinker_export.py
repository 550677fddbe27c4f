"""Age-encrypted exports through the SDK: save_weights_external(age_encryption_recipients=...)
serves only ``.age`` files, they decrypt with the identity to the plain export's bytes, and no
plaintext of the export is kept on disk."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pyrage
import pytest
import requests
import tinker

pytestmark = pytest.mark.e2e


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as response:
        return response.read()


def test_encrypted_export_decrypts_to_the_plain_export(server, training):
    rest = tinker.RestClient(base_url=server.url, api_key="tml-test-key")
    identity = pyrage.x25519.Identity.generate()
    other = pyrage.x25519.Identity.generate()  # a second recipient: either one decrypts
    recipients = [str(identity.to_public()), str(other.to_public())]
    sealed = training.save_weights_external("sealed", age_encryption_recipients=recipients).result().path
    plain = training.save_weights_external("plain").result().path
    sealed_urls = rest.get_external_weights_urls(sealed).result().urls
    plain_urls = rest.get_external_weights_urls(plain).result().urls
    assert sorted(sealed_urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    for name, url in plain_urls.items():
        ciphertext = _fetch(sealed_urls[name + ".age"])
        assert ciphertext.startswith(b"age-encryption.org/v1")
        assert pyrage.decrypt(ciphertext, [identity]) == _fetch(url)
        assert pyrage.decrypt(ciphertext, [other]) == _fetch(url)
    # On disk: only ciphertext.
    run, _, name = sealed.removeprefix("tinker://").partition("/external_weights/")
    folder = Path(server.env["THINKER_DATA_DIR"]) / "checkpoints" / run / "external_weights" / name
    assert sorted(p.name for p in folder.iterdir()) == sorted(sealed_urls)
    archive = requests.get(f"{server.url}/api/v1/training_runs/{run}/checkpoints/external_weights/{name}/archive")
    assert archive.status_code == 400 and "encrypted" in archive.json()["error"]


@pytest.mark.parametrize("recipient", ["age1notakey", "not a key", ""])
def test_a_bad_recipient_is_a_bad_request(training, recipient):
    with pytest.raises(tinker.BadRequestError, match=r"age_encryption_recipients\[0\]"):
        training.save_weights_external("bad", age_encryption_recipients=[recipient]).result()
