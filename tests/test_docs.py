"""The README is the front door (≤ 300 lines) and every relative link in it and in docs/ resolves: the file exists
and, for a link with an anchor, the target has that heading (GitHub's anchor rule)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, as GitHub makes them."""
    out, code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        if code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = "".join(c for c in title if c.isalnum() or c in " -_").replace(" ", "-")
        out.add(slug)
    return out


def links(path: Path) -> list[str]:
    text, out, code = path.read_text(), [], False
    for line in text.splitlines():
        if line.startswith("```"):
            code = not code
        if not code:
            out += LINK.findall(line)
    return [t for t in out if not t.startswith(("http://", "https://", "mailto:"))]


def test_readme_fits_on_a_screen():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken
