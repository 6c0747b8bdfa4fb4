"""Reading JSON Lines and atomically writing files (text, JSON, JSONL): the one implementation that training,
evaluation and sweeps use.

Every file comol writes is written to a temporary file in the destination directory and then moved into place
with :func:`os.replace`, so a reader never sees a half-written file and an interrupted run never leaves
one behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from comol.errors import UserError


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then rename).

    Args:
        path: destination file; its parent directories are created.
        text: the full content.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    return atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records))


def read_utf8(path: str | os.PathLike[str]) -> str:
    """The text of a UTF-8 file; a UserError naming the byte and line where it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte {err.start}, line {line}); re-encode the file as UTF-8."
        ) from err


def iter_jsonl_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (lines count from 1).

    Lines are separated by ``\\n`` only (JSON strings may hold other Unicode line separators).

    Raises:
        UserError: the file does not exist, is not UTF-8, or a line is not a JSON object (the message names
            the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path.")
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); JSON Lines files hold "
                "one JSON object per line."
            ) from err
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        yield number, record


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file, skipping blank lines (see :func:`iter_jsonl_lines`)."""
    for _, record in iter_jsonl_lines(path):
        yield record


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All the objects of a JSONL file (see :func:`iter_jsonl_lines`)."""
    return list(iter_jsonl(path))
