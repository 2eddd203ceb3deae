"""The README as a newcomer meets it (#19): the two commands and a table of contents on the first screen, every link
of the contents to a heading that exists, every document it points to present, and CI running the README's test
command and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_first_40_lines_have_the_two_commands_and_the_contents():
    first = "\n".join(README.splitlines()[:40])
    assert "`make demo`" in first and "`make test`" in first
    assert "## Contents" in first


def test_every_link_to_a_heading_resolves_and_every_linked_document_exists():
    headings = {_slug(h) for h in re.findall(r"^#{1,4} (.+)$", README, re.MULTILINE)}
    anchors = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert anchors and anchors <= headings, anchors - headings
    for path in set(re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)\)", README)):
        assert (ROOT / path).is_file(), path


def test_ci_runs_the_readmes_test_command_and_nothing_else():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == ["make test"]
