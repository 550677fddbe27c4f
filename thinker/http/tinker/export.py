"""Age-encrypted exports: ``save_weights_external(..., age_encryption_recipients=[...])``.

The export's files are encrypted (``pyrage``, the age format) to every recipient before the
checkpoint exists, and the plaintext is deleted: the server never keeps, and never hands out,
plaintext of an export someone asked to have encrypted. Each file is then served as
``<name>.age`` by ``external_weights_urls``, which is what the cookbook's ``weights.download``
expects (it decrypts with the identity it generated for the download).

Every export (encrypted or not) names the output head's LoRA as Tinker's exports do
(backend/lora/peft_files.py ``to_tinker_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyrage

from backend.lora.layer import short_name
from thinker.core.errors import BadRequestError, clip

AGE_SUFFIX = ".age"
MAX_RECIPIENTS = 64


def recipients(given: Sequence[str]) -> list:
    """The recipients as pyrage objects: age X25519 keys (``age1...``) or SSH public keys;
    anything else is a 400 naming it."""
    if len(given) > MAX_RECIPIENTS:
        raise BadRequestError(f"age_encryption_recipients: {len(given)} recipients, over the limit of {MAX_RECIPIENTS}")
    parsed = []
    for i, text in enumerate(given):
        text = text.strip() if isinstance(text, str) else ""
        try:
            if text.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(text))
            elif text.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(text))
            else:
                raise ValueError("not an age (age1...) or SSH public key")
        except (ValueError, pyrage.RecipientError) as exc:
            field = f"age_encryption_recipients[{i}]"
            raise BadRequestError(f"{field}: {clip(repr(text))} is not a recipient: {exc}") from None
    return parsed


def encrypt_folder(folder: Path, to: list) -> None:
    """Replace every file in ``folder`` with ``<name>.age``, encrypted to ``to``."""
    for plain in sorted(p for p in folder.iterdir() if p.is_file()):
        pyrage.encrypt_file(str(plain), str(plain) + AGE_SUFFIX, to)
        plain.unlink()


def head_path(loaded) -> str | None:
    """The output head's module path, when LoRA may target it."""
    if loaded.head_module is None:
        return None
    return next((path for path in loaded.lora_layers if short_name(path) == loaded.head_module), None)


def served_names(folder: Path, names: Sequence[str]) -> list[str]:
    """The files an export serves: ``names``, or their ``.age`` form if it was encrypted."""
    return [name + AGE_SUFFIX if (folder / (name + AGE_SUFFIX)).exists() else name for name in names]
