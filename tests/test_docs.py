"""The documentation stays true to the code: every setting of ``Config`` has its row in
docs/configuration.md, every relative link in README.md and docs/*.md reaches an existing file
(and heading), and the README stays short enough to read first."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from thinker.core.config import Config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 15 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# A configuration row: its first cell is exactly one variable name in backticks.
CONFIG_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", re.MULTILINE)


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (links and headings there are not links or headings)."""
    return FENCE.sub("", markdown)


def slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a document (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(prose(markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_every_config_variable_has_a_row_in_the_configuration_reference():
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(CONFIG_ROW.findall(table))
    variables = {f.name.upper() for f in dataclasses.fields(Config)}
    missing = sorted(variables - documented)
    hint = "add one row per variable: name, default, what it does"
    assert not missing, f"docs/configuration.md has no row for {missing}: {hint}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in slugs(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_every_document_under_docs_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_readme_stays_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT_BYTES})"


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("# Logs: `LOG_LEVEL` and `LOG_FORMAT`", {"logs-log_level-and-log_format"}),
        ("## 3. Fused passes (BATCHING, on by default)", {"3-fused-passes-batching-on-by-default"}),
        ("## Tuning\n## Tuning", {"tuning", "tuning-1"}),
        ("```\n# not a heading\n```\n## Real", {"real"}),
    ],
)
def test_heading_anchors_follow_githubs_rules(markdown, expected):
    assert slugs(markdown) == expected
