"""README.md is an entry point and every relative link in it and in docs/*.md resolves."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import REPO

README_MAX_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), with an optional "title"; text may span lines
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(markdown: str) -> str:
    """``markdown`` without fenced code blocks (a ``# comment`` in one is not a heading, and a
    link in one is not followed)."""
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower-case, spaces to ``-``, and every
    character that is not a letter, digit, ``-`` or ``_`` dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of ``markdown``'s headings; a repeated slug gets ``-1``, ``-2``... as on
    GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(markdown)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(markdown: str) -> list[str]:
    """The targets of the markdown links in ``markdown``'s prose (not in code)."""
    return LINK.findall(CODE_SPAN.sub("", prose(markdown)))


def broken_links(doc: Path) -> list[str]:
    """Each relative link of ``doc`` whose file, or whose ``#anchor`` in that file, is missing."""
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / unquote(path)).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and unquote(anchor) not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file}")
    return broken


def test_slug_follows_githubs_rules() -> None:
    assert slug("Speed (`scripts/bench_speed.py`)") == "speed-scriptsbench_speedpy"
    assert slug("COCO with torchvision's teachers") == "coco-with-torchvisions-teachers"
    assert slug("Observations (measured by hand)") == "observations-measured-by-hand"
    assert slug("`distill predict`") == "distill-predict"
    assert slug("KD did not help on my data") == "kd-did-not-help-on-my-data"
    assert slug("A [linked](x.md) heading") == "a-linked-heading"
    assert anchors("# Same\n## Same\n```\n# not a heading\n```\n") == {"same", "same-1"}


def test_links_are_found_outside_code_only() -> None:
    text = (
        'See [a](a.md), ![b](img/b.png) and [c\nd](c.md#x "title").\n'
        "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n[web](https://example.com)\n"
    )
    assert links(text) == ["a.md", "img/b.png", "c.md#x", "https://example.com"]


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Top\n[ok](docs/a.md#its-part) [ok](#top) [web](https://x.org/none)\n"
        "[gone](docs/b.md) [no heading](docs/a.md#other) [no anchor here](#nowhere)\n"
    )
    found = broken_links(doc)
    assert [f.split(":")[0] for f in found] == ["docs/b.md", "docs/a.md#other", "#nowhere"]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert broken_links(doc) == []


def test_docs_exist_and_readme_links_each() -> None:
    docs = documents()[1:]
    assert docs, "docs/*.md is empty"
    targets = {t.partition("#")[0] for t in links((REPO / "README.md").read_text())}
    for doc in docs:
        assert f"docs/{doc.name}" in targets, f"README.md does not link docs/{doc.name}"


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"
