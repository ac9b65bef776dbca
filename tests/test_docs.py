"""The documentation under docs/ is what the code points to.

1. No file of the repository names the team's old internal notes (a design or data-common
   markdown file outside docs/): every such pointer must lead to a file shipped under docs/.
2. Every ``docs/<name>.md`` that code, tests, configs, scripts, README or docs mention exists,
   and where the mention names a section (``docs/<name>.md#anchor``, or ``docs/<name>.md,
   "Heading"``) the file has that heading. Relative links inside docs/ (``[text](other.md#anchor)``,
   ``[text](#anchor)``) are checked the same way.

Anchors are GitHub's: the heading lower-cased, punctuation dropped, spaces turned into hyphens,
a repeated heading suffixed -1, -2, ...
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Spelled in pieces, so this file does not name what it looks for.
_OLD_NOTES = re.compile(r"(?<!docs/)\b(?:" + "design" + "|" + "data_" + "common" + r")\.md\b")
_DOC_MENTION = re.compile(r"(?<![\w/.-])docs/([\w.-]+?\.md)(?:#([\w-]+)|,\s*\"([^\"\n]+)\")?")
_MD_LINK = re.compile(r"\]\(([^)\s]*?)(?:#([\w-]+))?\)")
_SKIP_DIRS = {".git", "__pycache__", ".venv", "venv", "runs", "node_modules", ".pytest_cache", ".ruff_cache"}
_BINARY_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".mp4", ".npz", ".npy", ".bin", ".pt", ".zip", ".gz",
                    ".safetensors", ".pkl", ".p", ".ico", ".pdf"}


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), or every file outside .git and build
    folders when the copy is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(folder) / name for name in names]
    return sorted(f for f in files if f.is_file() and f.suffix.lower() not in _BINARY_SUFFIXES)


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())     # punctuation, backticks, ...
    return text.replace(" ", "-")


def headings(path: Path) -> tuple[set[str], set[str]]:
    """(anchors, heading texts) of a markdown file; headings inside fenced code are not headings."""
    anchors, texts, seen, fenced = set(), set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = match.group(1)
            base = slug(text)
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
            texts.add(text.strip())
    return anchors, texts


def test_slug_follows_github():
    assert slug("Stage 1: the class-agnostic segmentor") == "stage-1-the-class-agnostic-segmentor"
    assert slug("2026-12-01: pairwise class loss") == "2026-12-01-pairwise-class-loss"
    assert slug("Vision encoder and LLM (Qwen3-VL)") == "vision-encoder-and-llm-qwen3-vl"
    assert slug("Special tokens, chat template and condition spans") == \
        "special-tokens-chat-template-and-condition-spans"
    assert slug("`x2sam_jax` layout") == "x2sam_jax-layout"


@pytest.fixture(scope="module")
def texts() -> dict[Path, str]:
    out = {}
    for path in repository_files():
        text = read_text(path)
        if text is not None:
            out[path] = text
    assert out, "no repository files found"
    return out


def test_no_pointer_to_the_old_internal_notes(texts):
    bad = []
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if _OLD_NOTES.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "point to a file under docs/ instead:\n" + "\n".join(bad)


def test_docs_mentions_resolve(texts):
    cache: dict[Path, tuple[set[str], set[str]]] = {}
    bad, found = [], 0
    for path, text in texts.items():
        for match in _DOC_MENTION.finditer(text):
            found += 1
            name, anchor, title = match.groups()
            target = DOCS / name
            where = f"{path.relative_to(ROOT)}: {match.group(0)}"
            if not target.is_file():
                bad.append(f"{where}: no such file")
                continue
            anchors, titles = cache.setdefault(target, headings(target))
            if anchor and anchor not in anchors:
                bad.append(f"{where}: no heading with anchor #{anchor} (has: {sorted(anchors)})")
            if title and title not in titles:
                bad.append(f"{where}: no heading {title!r}")
    assert found, "expected the code to point into docs/"
    assert not bad, "\n".join(bad)


def test_links_inside_docs_resolve():
    bad = []
    for path in sorted(DOCS.glob("*.md")):
        prose = re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        prose = re.sub(r"`[^`\n]*`", "", prose)                    # code spans are not links
        for match in _MD_LINK.finditer(prose):
            target, anchor = match.groups()
            if re.match(r"^[a-z]+:", target or ""):
                continue                                            # http(s), mailto
            file = path if not target else (path.parent / target).resolve()
            if not file.exists():
                bad.append(f"{path.name}: {match.group(0)}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in headings(file)[0]:
                bad.append(f"{path.name}: {match.group(0)}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)
