"""Documentation: every Markdown table renders, every relative link resolves, README stays short.

The Markdown files are those git knows (tracked, or new and not ignored): README.md, docs/, k8s/,
examples/. Tables are counted the way GitHub's renderer (cmark-gfm) splits them: a row is cut at
every `|` not preceded by a backslash, *including* one inside a code span, so `a|b` in backticks in
a table cell is two cells; `\\|` is a literal pipe, in code too.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

README_LIMIT_BYTES = 12_000
"""The README is the front page; reference material lives in docs/."""

DOCS_PAGES_LINKED_FROM_README = (
    "docs/config.md",
    "docs/precision.md",
    "docs/checkpointing.md",
    "docs/multi_gpu.md",
    "docs/deployment.md",
    "docs/storage.md",
    "docs/data.md",
    "docs/performance.md",
)

# Spelled in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("../" + "shared", "DESIGN" + ".md")


def repo_files(pattern: str | None = None) -> list[Path]:
    """Files git knows (tracked, or untracked and not ignored) that exist in the working tree."""
    args = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]
    if pattern:
        args += ["--", pattern]
    try:
        out = subprocess.run(args, cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:  # not a git checkout (e.g. an unpacked sdist)
        pytest.skip(f"git ls-files unavailable: {error}")
    names = sorted({name for name in out.decode().split("\0") if name})
    return [REPO / name for name in names if (REPO / name).is_file()]


def markdown_files() -> list[Path]:
    return repo_files("*.md")


# --- Markdown structure -------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
DELIMITER_CELL = re.compile(r"^\s*:?-+:?\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not line.strip(" `~"):
                fence = None
        else:
            lines.append((number, line))
    return lines


def split_row(line: str) -> list[str]:
    """A table row's cells as GitHub splits them: at every `|` not preceded by `\\`, code spans included."""
    row = line.strip()
    cells, current, previous = [], [], ""
    for char in row:
        if char == "|" and previous != "\\":
            cells.append("".join(current))
            current = []
        else:
            current.append(char)
        previous = char
    cells.append("".join(current))
    if row.startswith("|"):
        cells = cells[1:]
    if len(cells) > 1 and row.endswith("|") and not row.endswith("\\|"):
        cells = cells[:-1]
    return [cell.strip() for cell in cells]


def is_delimiter_row(line: str) -> bool:
    return "-" in line and "|" in line and all(DELIMITER_CELL.match(cell) for cell in split_row(line))


@dataclass
class Table:
    line: int
    header: list[str]
    rows: list[tuple[int, list[str]]]


def find_tables(text: str) -> list[Table]:
    """Every table: a header row, a delimiter row right under it, then rows up to a blank line."""
    lines = prose_lines(text)
    tables, i = [], 0
    while i + 1 < len(lines):
        (number, line), (next_number, next_line) = lines[i], lines[i + 1]
        if "|" in line and next_number == number + 1 and is_delimiter_row(next_line):
            table = Table(number, split_row(line), [(next_number, split_row(next_line))])
            i += 2
            while i < len(lines) and lines[i][0] == table.rows[-1][0] + 1 and lines[i][1].strip():
                table.rows.append((lines[i][0], split_row(lines[i][1])))
                i += 1
            tables.append(table)
        else:
            i += 1
    return tables


def table_problems(text: str, name: str = "<text>") -> list[str]:
    problems = []
    for table in find_tables(text):
        width = len(table.header)
        for number, cells in table.rows:
            if len(cells) != width:
                problems.append(f"{name}:{number}: {len(cells)} cells, the header (line {table.line}) has {width}")
    return problems


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    found = []
    for number, line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        found += [(number, target) for target in INLINE_LINK.findall(line)]
        found += [(number, target) for target in HTML_LINK.findall(line)]
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def link_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(REPO)
    problems = []
    for number, target in links(text):
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{name}:{number}: {target}"
        if not destination.is_relative_to(REPO.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with that anchor in {destination.relative_to(REPO.resolve())}")
    return problems


# --- the parser's own checks: it must be able to fail ------------------------------------------

BROKEN_TABLE = """\
| key | default | meaning |
|---|---|---|
| `data.train` | `null` | Training data: a file or a directory/prefix of
them (local path or `s3://`), read in sorted order. |
| `a` | `b` | `x|y` splits this cell in two on GitHub |
| `a` | `b` | `x\\|y` is one cell |
"""


def test_table_parser_finds_broken_rows() -> None:
    [table] = find_tables(BROKEN_TABLE)
    assert table.header == ["key", "default", "meaning"]
    assert [len(cells) for _, cells in table.rows] == [3, 3, 1, 4, 3]
    assert table_problems(BROKEN_TABLE, "t.md") == [
        "t.md:4: 1 cells, the header (line 1) has 3",
        "t.md:5: 4 cells, the header (line 1) has 3",
    ]


def test_table_parser_ignores_code_blocks_and_needs_a_delimiter_row() -> None:
    text = "```\n| a | b |\n|---|---|\n| 1 |\n```\n\n| not | a table |\n| just | pipes | here |\n"
    assert find_tables(text) == []
    assert split_row("| `a` | b \\| c |") == ["`a`", "b \\| c"]
    assert split_row("a | b") == ["a", "b"]


def test_link_and_anchor_helpers() -> None:
    text = 'See [x](docs/a.md#b), ![i](img.png "t"), `[not](a link)`, <a href="k8s/">k</a>\n[r]: ../up.md\n'
    assert [target for _, target in links(text)] == ["docs/a.md#b", "img.png", "k8s/", "../up.md"]
    assert github_anchor("Sizing `checkpoint.grace_seconds` per cloud") == "sizing-checkpointgrace_seconds-per-cloud"
    assert github_anchor("Multi-node (JobSet)") == "multi-node-jobset"
    assert anchors("# A\n## A\n") == {"a", "a-1"}


# --- the repository's documents ----------------------------------------------------------------


def test_markdown_files_are_found() -> None:
    names = {str(path.relative_to(REPO)) for path in markdown_files()}
    assert {"README.md", "k8s/README.md", "docs/config.md"} <= names


def test_every_markdown_table_row_has_the_headers_number_of_cells() -> None:
    problems = []
    for path in markdown_files():
        problems += table_problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not problems, "tables GitHub renders wrongly (escape | as \\|, one line per row):\n" + "\n".join(problems)


def test_every_relative_link_resolves_inside_the_repository() -> None:
    problems = []
    for path in markdown_files():
        problems += link_problems(path)
    assert not problems, "\n".join(problems)


def test_no_file_refers_to_a_path_outside_the_repository() -> None:
    problems = []
    for path in repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for number, line in enumerate(text.splitlines(), start=1):
            problems += [f"{path.relative_to(REPO)}:{number}: {ref}" for ref in OUTSIDE_REFERENCES if ref in line]
    assert not problems, "references to files that are not in the repository:\n" + "\n".join(problems)


def test_readme_is_short_and_links_the_docs() -> None:
    readme = REPO / "README.md"
    size = len(readme.read_bytes())
    assert size < README_LIMIT_BYTES, f"README.md is {size:,} bytes; move reference material to docs/"
    targets = {target.partition("#")[0] for _, target in links(readme.read_text(encoding="utf-8"))}
    missing = [page for page in DOCS_PAGES_LINKED_FROM_README if page not in targets]
    assert not missing, f"README.md does not link {missing}"
