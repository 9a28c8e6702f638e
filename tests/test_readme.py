"""The README stays a five-minute read that leads to every page under docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 140


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section, up to the next ``## `` heading."""
    assert f"\n## {title}\n" in text, f"the README has no '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_every_docs_page_is_in_the_readme_index() -> None:
    index = section(README.read_text(), "Documentation")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", index))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert len(pages) > 5
    assert not pages - linked, f"not in the README's index: {sorted(pages - linked)}"
    assert not linked - pages, f"the index links pages that do not exist: {sorted(linked - pages)}"


def test_the_quick_start_has_two_bash_blocks() -> None:
    quick = section(README.read_text(), "Quick start")
    assert quick.count("```bash\n") == 2


def test_the_readme_picture_exists() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert images
    for image in images:
        assert (ROOT / image).is_file(), image
