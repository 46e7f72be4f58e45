"""What a suite file holds, apart from what describes one run of it.

The suite's JSON (`evaluate@R`'s DVC metric, git-tracked) and the suite inputs' manifest (inside `suite_inputs@R`'s
DVC output) hold only what the data, code and params determine. Wall-clock seconds describe one run: they go to a
`.run.json` beside the file (git-ignored, not a DVC output), as training's run.json does, so re-running an unchanged
stage on any machine writes the same bytes and leaves `git status` clean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loc2vec.core.atomic import write_text

RUN_SUFFIX = ".run.json"


def is_run_key(key: str) -> bool:
    """Keys that hold a run's wall-clock time (seconds, seconds_phases, seconds_scenes, ...)."""
    return key.startswith("seconds")


def split_run_info(obj: Any) -> tuple[Any, Any]:
    """(obj without its run keys at any depth, those keys in the same nesting; None if there are none)."""
    if not isinstance(obj, dict):
        return obj, None
    kept: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for key, value in obj.items():
        if is_run_key(str(key)):
            run[key] = value
            continue
        kept[key], inner = split_run_info(value)
        if inner is not None:
            run[key] = inner
    return kept, run or None


def run_info_path(path: Path) -> Path:
    """Where a file's run info goes: beside it (data/evaluate/R.json → data/evaluate/R.run.json; a directory's
    manifest: beside the directory)."""
    path = Path(path)
    return path.with_name(path.stem + RUN_SUFFIX) if path.suffix == ".json" else path.with_name(path.name + RUN_SUFFIX)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write `result` without its run keys to `path` and those keys beside it (run_info_path), each atomically."""
    kept, run = split_run_info(result)
    write_text(Path(path), json.dumps(kept, indent=2) + "\n")
    write_text(run_info_path(path), json.dumps(run or {}, indent=2) + "\n")
