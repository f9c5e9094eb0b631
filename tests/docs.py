"""The documentation as the tests read it: the pages, a page's sections and their fenced code blocks."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$", re.M)
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)


def pages() -> list[Path]:
    """README.md, CONTRIBUTING.md and every page under docs/."""
    return [README, ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]


def page(name: str) -> str:
    """A page's text by its name relative to the root: "README.md", "docs/systemd.md"."""
    return (ROOT / name).read_text()


def headings(text: str) -> list[re.Match[str]]:
    """The Markdown headings of `text`, not counting `#` lines inside code blocks (shell comments)."""
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)  # same offsets, code blanked out
    return list(HEADING.finditer(prose))


def section(text: str, title: str) -> str:
    """The section headed `title` (at any level), up to the next heading of the same or a higher level."""
    heads = headings(text)
    start = next((m for m in heads if m[2] == title), None)
    assert start is not None, f"no heading {title!r}"
    level = len(start[1])
    end = next((m.start() for m in heads if m.start() > start.start() and len(m[1]) <= level), len(text))
    return text[start.start():end]


def blocks(text: str, *langs: str) -> list[str]:
    """The bodies of the fenced code blocks of these languages (every block when none is named), in order."""
    return [m[2] for m in FENCE.finditer(text) if not langs or m[1] in langs]


def block(text: str, lang: str) -> str:
    """The first ```lang block of `text`."""
    found = blocks(text, lang)
    assert found, f"no {lang} block"
    return found[0]
