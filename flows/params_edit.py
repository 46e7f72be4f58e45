"""Edit single values of params.yaml in place, keeping its comments and layout (ruamel.yaml round trip).

params.yaml is the documented, commented source of every tunable: a flow that changes a value (the
regions a pipeline runs, a region's extract and checksum) must not rewrite it through a plain YAML dump,
which would drop every comment. ruamel.yaml's round-trip mode (installed with DVC, which edits its own
files the same way) loads the file with its comments, quotes and styles attached to the nodes; an edit
changes those nodes only and dumps the document again.

Nothing else in the file may change, and that is checked, not assumed; the edit is refused
(ParamsEditError, the file left as it was) when:

* the unedited document does not dump back byte for byte (a layout ruamel.yaml cannot reproduce), so
  every difference in the result comes from the edited nodes;
* the result, parsed the way params.yaml is read (PyYAML), is not exactly the original with the intended
  changes applied;
* a comment of the original is missing from the result.

A value is replaced in place: a list keeps its style (flow `[a, b]` or block `- a`) and the comment after
it, a scalar keeps its quotes. A new key is appended to its mapping, after the mapping's last entry and
before the blank lines and comments that follow it. The file is replaced atomically (loc2vec.core.atomic).
"""

from __future__ import annotations

import copy
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from loc2vec.core.atomic import write_text
from loc2vec.core.errors import Loc2VecError


class ParamsEditError(Loc2VecError, RuntimeError):
    """params.yaml does not have the shape an in-place edit needs; it was left unchanged."""


# ---------------------------------------------------------------- the round trip


def _round_trip(text: str) -> YAML:
    """A round-trip YAML that writes this file's layout (indentation guessed from it, no line wrapping)."""
    _, indent, dash_offset = load_yaml_guess_indent(text)
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 1 << 16  # never fold a long value onto a second line
    rt.indent(mapping=indent or 2, sequence=(indent or 2) + (dash_offset or 0), offset=dash_offset or 0)
    # `key: null` stays `null` (round-trip mode would write an empty value, which means the same but reads worse)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _dump(rt: YAML, doc: Any) -> str:
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def _comments(text: str) -> Counter[str]:
    """Every comment of a YAML text (whole-line and trailing), as written."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        quote = None
        for i, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (i == 0 or line[i - 1] in " \t[{,:-"):
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                out[line[i:].rstrip()] += 1
                break
    return out


# ---------------------------------------------------------------- values


_PLAIN_RE = re.compile(r"[A-Za-z0-9_./@+-][A-Za-z0-9_./@:+-]*")


def _scalar(value: Any, old: Any = None) -> Any:
    """A value as the document should hold it: a string keeps the old value's quotes, else is plain when it
    reads back as the same string (names, paths, checksums), else double-quoted."""
    if not isinstance(value, str):
        return value
    if isinstance(old, DoubleQuotedScalarString | SingleQuotedScalarString):
        return type(old)(value)
    if _PLAIN_RE.fullmatch(value) and yaml.safe_load(value) == value:
        return value
    return DoubleQuotedScalarString(value)


def _node(value: Any) -> Any:
    """A new node for a value: mappings block style, lists flow style (`[a, b]`, as params.yaml writes them)."""
    if isinstance(value, dict):
        out = CommentedMap()
        for k, v in value.items():
            out[k] = _node(v)
        return out
    if isinstance(value, list | tuple):
        seq = CommentedSeq(_scalar(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    return _scalar(value)


def _set_items(seq: CommentedSeq, values: Sequence[Any]) -> None:
    """Replace a list's items in place: its style, the comments on its items and the lines after it stay (a
    comment on an item that goes is dropped with it, which `edit` then refuses)."""
    old = len(seq)
    after = _detach_following(seq, old - 1, 0) if old else None
    for i, value in enumerate(values):
        if i < old:
            seq[i] = _scalar(value, seq[i])
        else:
            seq.append(_scalar(value))
    while len(seq) > len(values):
        del seq[len(seq) - 1]  # ruamel drops the item's comments with it
    if after is not None and values:
        _attach_following(after, seq, len(values) - 1, 0)


# ---------------------------------------------------------------- comments that follow a block
# ruamel keeps the blank lines and comments after a line in one token with the line's own trailing
# comment: slot 2 of a mapping entry, slot 0 of a list item. Appending after that line moves the
# following lines (not the line's own comment) to the new last line.


def _block(node: Any) -> bool:
    """A non-empty block-style mapping or list (a flow one keeps its comments inside its brackets)."""
    return isinstance(node, CommentedMap | CommentedSeq) and bool(len(node)) and not node.fa.flow_style()


def _last_key(node: CommentedMap | CommentedSeq) -> Any:
    return next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1


def _slot(node: CommentedMap | CommentedSeq) -> int:
    return 2 if isinstance(node, CommentedMap) else 0


def _detach_following(container: Any, key: Any, slot: int) -> tuple[str, Any] | None:
    """Take the lines that follow entry `key` off its comment token (its own trailing comment stays)."""
    entry = container.ca.items.get(key)
    token = entry[slot] if entry else None
    if token is None:
        return None
    own, sep, rest = token.value.partition("\n")
    if not rest:
        return None
    if own.strip():
        kept = copy.copy(token)
        kept.value = own + sep
        entry[slot] = kept
    else:
        entry[slot] = None
        if not any(entry):
            del container.ca.items[key]
    return rest, token


def _attach_following(following: tuple[str, Any], container: Any, key: Any, slot: int) -> None:
    """Put lines taken by `_detach_following` after entry `key` (after its own trailing comment, if any)."""
    rest, template = following
    entry = container.ca.items.setdefault(key, [None, None, None, None])
    token = copy.copy(entry[slot] if entry[slot] is not None else template)
    token.value = (entry[slot].value if entry[slot] is not None else "\n") + rest
    entry[slot] = token


def _deepest_last(container: Any, key: Any) -> tuple[Any, Any]:
    """The entry whose line is the last one of `container[key]` (a block value's last line, recursively)."""
    while _block(container[key]):
        container = container[key]
        key = _last_key(container)
    return container, key


def _append(mapping: CommentedMap, key: str, value: Any) -> None:
    """mapping[key] = value as its new last entry, before what followed the old last one (blank lines, the
    next section's comments); the old last line keeps its own trailing comment."""
    following = None
    if len(mapping):
        node, last = mapping, _last_key(mapping)
        while True:  # the deepest last entry that carries the following lines
            found = _detach_following(node, last, _slot(node))
            if found is not None or not _block(node[last]):
                following = found
                break
            node = node[last]
            last = _last_key(node)
    mapping[key] = value
    if following is not None:
        container, last = _deepest_last(mapping, key)
        _attach_following(following, container, last, _slot(container))


def _apply(doc: CommentedMap, key_path: Sequence[str], value: Any) -> None:
    node: Any = doc
    for depth, key in enumerate(key_path[:-1]):
        if key not in node:
            _append(node, key, CommentedMap())
        node = node[key]
        if not isinstance(node, CommentedMap):
            raise ParamsEditError(f"params.yaml {'.'.join(key_path[: depth + 1])} is not a mapping")
    last = key_path[-1]
    if last not in node:
        _append(node, last, _node(value))
        return
    old = node[last]
    if isinstance(old, dict) or isinstance(value, dict):
        raise ParamsEditError(f"params.yaml {'.'.join(key_path)}: only values and lists are edited in place")
    if isinstance(value, list | tuple):
        if isinstance(old, CommentedSeq):
            _set_items(old, value)
        else:
            node[last] = _node(value)
    else:
        node[last] = _scalar(value, old)


# ---------------------------------------------------------------- the edit


def _set(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for depth, key in enumerate(path[:-1]):
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ParamsEditError(f"params.yaml {'.'.join(path[: depth + 1])} is not a mapping")
    data[path[-1]] = value


def edit(path: Path, changes: dict[tuple[str, ...], Any]) -> bool:
    """Set each key path to its value (a scalar or a list of scalars; a new key may get a mapping); a missing
    key is appended to its parent mapping. Returns whether the file changed. Refuses (ParamsEditError) any
    edit that would change more than that (see the module doc)."""
    text = path.read_text()
    original = yaml.safe_load(text) or {}
    expected = copy.deepcopy(original)
    for key_path, value in changes.items():
        _set(expected, key_path, list(value) if isinstance(value, tuple) else value)
    if expected == original:
        return False
    rt = _round_trip(text)
    doc = rt.load(text)
    if not isinstance(doc, CommentedMap):
        raise ParamsEditError(f"{path}: expected a mapping of sections")
    if _dump(rt, doc) != text:
        raise ParamsEditError(f"{path}: its layout does not survive a YAML round trip; edit it by hand")
    for key_path, value in changes.items():
        _apply(doc, key_path, value)
    new_text = _dump(rt, doc)
    try:
        parsed = yaml.safe_load(new_text)
    except yaml.YAMLError as exc:
        raise ParamsEditError(f"editing {path} would break its YAML ({exc}); left unchanged") from exc
    if parsed != expected:
        raise ParamsEditError(f"editing {path} in place would change more than {sorted(changes)}; left unchanged")
    lost = _comments(text) - _comments(new_text)
    if lost:
        raise ParamsEditError(f"editing {path} in place would drop comments {sorted(lost)}; left unchanged")
    write_text(path, new_text)
    return True


def set_pipeline_regions(path: Path, regions: Sequence[str]) -> bool:
    """params.yaml pipeline.regions = regions (what `dvc repro` and the pipeline flow run)."""
    return edit(path, {("pipeline", "regions"): list(regions)})


def set_region_source(path: Path, region: str, source: str, sha256: str) -> bool:
    """params.yaml regions.registry.<region> = {source, sha256} (added if the region is new)."""
    registry = (yaml.safe_load(path.read_text()) or {}).get("regions", {}).get("registry") or {}
    if region in registry:
        return edit(
            path, {("regions", "registry", region, "source"): source, ("regions", "registry", region, "sha256"): sha256}
        )
    return edit(path, {("regions", "registry", region): {"source": source, "sha256": sha256}})
