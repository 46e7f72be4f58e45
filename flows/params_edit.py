"""Edit single values of params.yaml in place, keeping its comments and layout.

params.yaml is the documented, commented source of every tunable: a flow that changes a value (the
regions a pipeline runs, a region's extract and checksum) must not rewrite it through a YAML dump, which
would drop every comment. So an edit replaces the value on the key's own line (block-style YAML, as
params.yaml is written), keeping the line's trailing comment, or appends a key to a mapping block; then
the result is parsed and compared with the intended change applied to the parsed original: any other
difference, and the edit is refused. The file is replaced atomically (loc2vec.atomic).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loc2vec.atomic import write_text
from loc2vec.errors import Loc2VecError

_KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.@-]+|\"[^\"]*\"|'[^']*'):(?P<rest>.*)$")


class ParamsEditError(Loc2VecError, RuntimeError):
    """params.yaml does not have the shape an in-place edit needs; it was left unchanged."""


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _find_key(lines: list[str], path: Sequence[str]) -> tuple[int, int]:
    """(line index of the last key of `path`, end of its block: the first later content line at an indent
    ≤ the key's). Keys are matched at the indent of their mapping's first key."""
    lo, hi, indent = 0, len(lines), 0
    found = -1
    for depth, key in enumerate(path):
        found = -1
        for i in range(lo, hi):
            if not _is_content(lines[i]):
                continue
            if depth and _indent(lines[i]) < indent:
                break
            m = _KEY_RE.match(lines[i])
            if m and len(m["indent"]) == indent and m["key"].strip("\"'") == key:
                found = i
                break
        if found < 0:
            raise KeyError(".".join(path[: depth + 1]))
        end = next(
            (j for j in range(found + 1, hi) if _is_content(lines[j]) and _indent(lines[j]) <= indent),
            hi,
        )
        child = next((j for j in range(found + 1, end) if _is_content(lines[j])), None)
        lo, hi = found + 1, end
        indent = _indent(lines[child]) if child is not None else indent + 2
    return found, hi


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, '  # comment' or '') of the text after 'key:' (a '#' inside quotes is not a comment)."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            value = rest[:i].rstrip()
            return value, rest[len(value) :]
    return rest.rstrip(), ""


_PLAIN_RE = re.compile(r"[A-Za-z0-9_./@+-][A-Za-z0-9_./@:+-]*")


def scalar(value: Any) -> str:
    """A YAML flow value: plain when it reads back as the same string (names, paths, checksums), else JSON,
    which is YAML (strings quoted, lists in brackets), so it parses back exactly."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, str) and _PLAIN_RE.fullmatch(value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _set(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def edit(path: Path, changes: dict[tuple[str, ...], Any]) -> bool:
    """Set each key path to its value (a scalar or a list of scalars); a missing last key is appended to
    its parent mapping. Returns whether the file changed. Refuses (ParamsEditError) any edit whose parsed
    result is not exactly the original with these changes."""
    text = path.read_text()
    original = yaml.safe_load(text) or {}
    expected = copy.deepcopy(original)
    for key_path, value in changes.items():
        _set(expected, key_path, value)
    if expected == original:
        return False
    lines = text.splitlines()
    for key_path, value in changes.items():
        try:
            i, _ = _find_key(lines, key_path)
        except KeyError:
            lines = _append(lines, key_path, value)
            continue
        m = _KEY_RE.match(lines[i])
        assert m is not None
        old_value, comment = _split_comment(m["rest"])
        items = _block_sequence(lines, i, len(m["indent"])) if not old_value.strip() else []
        if isinstance(value, dict) or (not old_value.strip() and not items):
            raise ParamsEditError(f"params.yaml {'.'.join(key_path)}: only values and lists are edited in place")
        lines[i] = f"{m['indent']}{m['key']}: {scalar(value)}{comment}"
        lines = [line for j, line in enumerate(lines) if j not in items]  # a block list becomes a flow list
    new_text = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    try:
        parsed = yaml.safe_load(new_text)
    except yaml.YAMLError as exc:
        raise ParamsEditError(f"editing {path} would break its YAML ({exc}); left unchanged") from exc
    if parsed != expected:
        raise ParamsEditError(f"editing {path} in place would change more than {sorted(changes)}; left unchanged")
    write_text(path, new_text)
    return True


def _block_sequence(lines: list[str], key_line: int, key_indent: int) -> set[int]:
    """The lines of a block-style list under a key ("- item" at the key's indent or deeper, as PyYAML
    writes them, and their continuations); comment lines among them stay."""
    items: set[int] = set()
    for j in range(key_line + 1, len(lines)):
        line = lines[j]
        if not _is_content(line):
            continue
        stripped, indent = line.lstrip(" "), _indent(line)
        is_item = indent >= key_indent and (stripped == "-" or stripped.startswith("- "))
        if is_item or (items and indent > key_indent):  # an item, or the continuation of one
            items.add(j)
            continue
        break
    return items


def _append(lines: list[str], key_path: Sequence[str], value: Any) -> list[str]:
    """Append `key: value` (or a nested mapping) at the end of the parent's block."""
    parents = tuple(key_path[:-1])
    for depth in range(len(parents), -1, -1):  # the deepest existing ancestor
        try:
            start, end = _find_key(lines, parents[:depth]) if depth else (-1, len(lines))
            break
        except KeyError:
            continue
    child = next((j for j in range(start + 1, end) if _is_content(lines[j])), None)
    indent = _indent(lines[child]) if child is not None else (_indent(lines[start]) + 2 if start >= 0 else 0)
    while end > start + 1 and not _is_content(lines[end - 1]):  # before trailing blank lines/comments
        end -= 1
    new: list[str] = []
    for level, key in enumerate(key_path[depth:-1]):
        new.append(" " * (indent + 2 * level) + f"{key}:")
    level = len(key_path) - depth - 1
    if isinstance(value, dict):
        new.append(" " * (indent + 2 * level) + f"{key_path[-1]}:")
        new += [" " * (indent + 2 * (level + 1)) + f"{k}: {scalar(v)}" for k, v in value.items()]
    else:
        new.append(" " * (indent + 2 * level) + f"{key_path[-1]}: {scalar(value)}")
    return lines[:end] + new + lines[end:]


def set_pipeline_regions(path: Path, regions: Sequence[str]) -> bool:
    """params.yaml pipeline.regions = regions (what `dvc repro` and the pipeline flow run)."""
    return edit(path, {("pipeline", "regions"): list(regions)})


def set_region_source(path: Path, region: str, source: str, sha256: str) -> bool:
    """params.yaml regions.registry.<region> = {source, sha256} (added if the region is new)."""
    registry = (yaml.safe_load(path.read_text()) or {}).get("regions", {}).get("registry") or {}
    if region in registry:
        return edit(path, {("regions", "registry", region, "source"): source,
                           ("regions", "registry", region, "sha256"): sha256})  # fmt: skip
    return edit(path, {("regions", "registry", region): {"source": source, "sha256": sha256}})
