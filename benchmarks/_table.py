"""Tiny helpers shared by the benchmarks: markdown tables and marker sections of ``benchmarks/README.md``.

A benchmark owns one section of the README, delimited by HTML comments that markdown does not show::

    <!-- bench:span_step -->
    | date | device | ... |
    |---|---|---|
    | 2025-01-01 | AMD EPYC (2 threads) | ... |
    <!-- /bench:span_step -->

:func:`update_section` replaces what lies between the two markers (or appends the section at the end
of the file when the markers are missing) and writes the file atomically (temporary file in the same
folder, then ``os.replace``), so an interrupted benchmark never leaves a half-written README.
:func:`read_section` returns the current text, :func:`parse_table` / :func:`markdown_table` go
between a table's text and its rows, and :func:`merge_rows` replaces rows that share a key (so a
CPU result and a GPU result can sit in the same table and each run updates only its own rows).

Example:
    >>> rows = [["cpu", "1.02"], ["cuda", "1.01"]]
    >>> print(markdown_table(["device", "ratio"], rows))
    | device | ratio |
    |---|---|
    | cpu | 1.02 |
    | cuda | 1.01 |
    >>> merge_rows(rows, [["cpu", "1.03"]], key_columns=[0])
    [['cpu', '1.03'], ['cuda', '1.01']]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["markdown_table", "merge_rows", "parse_table", "read_section", "update_section"]


def _markers(name: str) -> tuple[str, str]:
    if not name or any(c in name for c in "<>\n") or "--" in name:
        raise ValueError(f"invalid section name {name!r}")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def _escape(cell: object) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (no trailing newline); ``|`` inside cells is escaped.

    Args:
        header: column titles.
        rows: one sequence of cells per row, each as long as ``header``.
    """
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {list(r)!r} has {len(r)} cells, header has {len(header)}")
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _split_row(line: str) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    cells, cur, i = [], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if body[i] == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(body[i])
        i += 1
    cells.append("".join(cur).strip())
    return cells


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table in ``text`` -> ``(header, rows)``; ``([], [])`` when there is none.

    Inverse of :func:`markdown_table` (escaped ``\\|`` come back as ``|``).
    """
    lines = [ln for ln in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].strip().startswith("|") and set(lines[i + 1].replace("|", "").strip()) <= set("-: ") \
                and lines[i + 1].strip().startswith("|"):
            header = _split_row(lines[i])
            rows = []
            for ln in lines[i + 2:]:
                if not ln.strip().startswith("|"):
                    break
                rows.append(_split_row(ln))
            return header, rows
    return [], []


def merge_rows(
    old: Sequence[Sequence[str]], new: Sequence[Sequence[str]], key_columns: Sequence[int]
) -> list[list[str]]:
    """Rows of ``old`` with those whose key (cells at ``key_columns``) appears in ``new`` replaced.

    A replaced row keeps its position; new rows with an unseen key are appended in their order.
    """
    def key(r: Sequence[str]) -> tuple[str, ...]:
        return tuple(str(r[k]) if k < len(r) else "" for k in key_columns)

    fresh = {key(r): [str(c) for c in r] for r in new}
    out: list[list[str]] = []
    used: set[tuple[str, ...]] = set()
    for r in old:
        k = key(r)
        if k in fresh:
            if k not in used:
                out.append(fresh[k])
                used.add(k)
        else:
            out.append([str(c) for c in r])
    for r in new:
        k = key(r)
        if k not in used:
            out.append(fresh[k])
            used.add(k)
    return out


def read_section(readme_path: str | os.PathLike, name: str) -> str | None:
    """Text between the markers of section ``name`` (stripped), or None if the file or markers are missing."""
    start, end = _markers(name)
    path = Path(readme_path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[i + len(start):j].strip("\n")


def update_section(readme_path: str | os.PathLike, name: str, markdown_text: str) -> None:
    """Replace the content of section ``name`` in ``readme_path`` with ``markdown_text``, atomically.

    The markers stay; the content sits on its own lines between them. If the markers are absent the
    section (markers included) is appended at the end of the file; a missing file is created.

    Args:
        readme_path: the markdown file (normally ``benchmarks/README.md``).
        name: section name, e.g. ``"span_step"`` for ``<!-- bench:span_step -->``.
        markdown_text: the new content (a table, optionally with notes).
    """
    start, end = _markers(name)
    path = Path(readme_path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{start}\n{markdown_text.strip(chr(10))}\n{end}"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        new = text[:i] + block + text[j + len(end):]
    else:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        new = text + sep + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
