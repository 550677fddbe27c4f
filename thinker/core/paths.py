"""The one place where paths under THINKER_DATA_DIR are built from ids and names.

Model ids, run ids and checkpoint names become folder names (``adapters/<model_id>/step_N``,
``checkpoints/<run_id>/<kind>/<name>``), and some of them come from callers. Every part must
therefore be a plain name (``check_name``): no "/", no "." or "..", no NUL or line break, so
no absolute path and no way up; and the joined path must still lie under its root once
resolved (a symlink inside cannot lead out). Anything else is a 400 before a byte is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from thinker.core.errors import BadRequestError

# fullmatch, never match + "$": "$" also matches before a final "\n", which would let
# "final\n" through as a name that could then never be read or deleted.
_NAME = re.compile(r"[A-Za-z0-9._:@+=-]{1,200}")


def check_name(value: str, field_name: str) -> str:
    """``value`` if it is a plain name (run ids, checkpoint names), else a 400 naming the field."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None or value in {".", ".."}:
        raise BadRequestError(
            f"{field_name}: {value!r} must be 1-200 characters of letters, digits and . _ : @ + = -"
        )
    return value


def path_under(root: str | Path, *parts: str, field_name: str = "id") -> Path:
    """``root/part/part/...``, each part a plain name, resolving inside ``root``; else a 400."""
    base = Path(root).resolve()
    for part in parts:
        check_name(part, field_name)
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base):
        raise BadRequestError(f"{field_name}: {'/'.join(parts)!r} leads outside the data folder")
    return path
