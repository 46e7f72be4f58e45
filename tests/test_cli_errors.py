"""Bad input through the real command line: every expected failure is one line naming the key, path or
value, with exit status 2; a bug says so in one line (exit 1) and shows its traceback only with --debug.

These are the bad inputs of the README's table "Bad input and faults" (the faults are tests/test_faults.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, VADUZ


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loc2vec.cli", *args], cwd=REPO, capture_output=True, text=True, env=env
    )


def _error_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """Exit `status`, no traceback, and exactly one error line on stderr (log lines aside); returns it."""
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line or "unexpected error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def _params(project: Path, tmp_path: Path, text: str | None = None, **sections) -> str:
    """A params file: the test project's, with sections replaced (or `text` verbatim)."""
    path = tmp_path / "params.yaml"
    if text is None:
        data = yaml.safe_load((project / "params.yaml").read_text())
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
        text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return str(path)


# (id, how to break params.yaml, what the one line must name)
BAD_PARAMS = [
    ("yaml-syntax", "train: [unclosed\n", "params.yaml (line 2, column 1)"),
    ("duplicate-key", "train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "duplicate key 'train'"),
    ("unknown-section", {"trian": {"lr": 0.1}}, "trian: unknown key"),
    ("unknown-key", {"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
    ("wrong-type", {"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
    ("port-text", {"db": {"port": "abc"}}, "db.port"),
    ("port-null", {"db": {"port": None}}, "db.port"),
    ("port-range", {"db": {"port": 70000}}, "db.port"),
    ("splits-sum", {"sample": {"splits": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "sample"),
    ("negative-steps", {"train": {"max_steps": -1}}, "train.max_steps"),
    ("unknown-pipeline-region", {"pipeline": {"regions": ["atlantis"]}}, "atlantis"),
    ("bad-isa", {"compute": {"cpu_isa": "avx9"}}, "compute.cpu_isa"),
    ("bad-role", {"db": {"reader": "Bad-Role"}}, "db.reader: a role name"),
    ("same-roles", {"db": {"user": "loc2vec", "reader": "loc2vec"}}, "db: user and reader must be different roles"),
    ("not-a-mapping", "- just\n- a list\n", "expected a mapping"),
]


@pytest.mark.parametrize(("case", "change", "named"), BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_are_one_line_naming_the_key(project: Path, tmp_path: Path, case: str, change, named: str) -> None:
    text = change if isinstance(change, str) else None
    params = _params(project, tmp_path, text, **({} if text else change))
    line = _error_line(_cli("--params", params, "features", "--lat", "47.14", "--lon", "9.52"))
    assert named in line, line


def test_missing_params_file_names_it(tmp_path: Path) -> None:
    line = _error_line(_cli("--params", str(tmp_path / "nope.yaml"), "features", "--lat", "47", "--lon", "9"))
    assert str(tmp_path / "nope.yaml") in line


# (id, arguments, what the one line must name)
BAD_ARGUMENTS = [
    (
        "shift-too-far",
        [
            "render",
            "--region",
            "test_li",
            "--lat",
            "47.14",
            "--lon",
            "9.52",
            "--shift-m",
            "10000",
            "10000",
            "--out",
            "x.npy",
        ],
        "shift",
    ),
    ("two-regions-for-one", ["evaluate", "--region", "a,b"], "expected one region"),
    (
        "inputs-without-suite",
        ["evaluate", "--region", "nowhere", "--inputs", "x"],
        "--inputs are the added-value suite",
    ),
    (
        "suite-inputs-missing",
        ["evaluate", "--suite", "consumer", "--region", "nowhere", "--inputs", "/nonexistent"],
        "no suite inputs at /nonexistent",
    ),
    ("reserved-region", ["ingest", "--region", "feast", "--pbf", "x.pbf"], "reserved"),
    ("bad-region-name", ["ingest", "--region", "Bad-Name", "--pbf", "x.pbf"], "invalid region name 'Bad-Name'"),
    ("missing-pbf", ["ingest", "--region", "nowhere", "--pbf", "/nonexistent/x.osm.pbf"], "/nonexistent/x.osm.pbf"),
    ("unknown-region", ["sample", "--region", "atlantis"], "atlantis"),
    ("latitude-range", ["features", "--lat", "100", "--lon", "9"], "latitude"),
    ("latitude-nan", ["features", "--lat", "nan", "--lon", "9"], "latitude"),
    ("not-published", ["features", "--lat", "0.0", "--lon", "0.0"], "("),
    ("unknown-store", ["features", "--lat", "47", "--lon", "9", "--online-store", "memcached"], "memcached"),
]


@pytest.mark.parametrize(("case", "args", "named"), BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line(region: str, case: str, args: list[str], named: str) -> None:
    proc = _cli(*args)
    if proc.stderr.startswith("usage:"):  # argparse's own check: its usage, then one error line, exit 2
        assert proc.returncode == 2 and named in proc.stderr.splitlines()[-1], proc.stderr
        return
    assert named in _error_line(proc)


def test_unwritable_out_names_the_path(region: str) -> None:
    out = "/proc/loc2vec-read-only/tile.npy"
    line = _error_line(_cli("render", "--region", region, "--lat", str(VADUZ[0]), "--lon", str(VADUZ[1]), "--out", out))
    assert "/proc/loc2vec-read-only" in line


@pytest.mark.parametrize(
    ("case", "dsn", "named"),
    [
        ("server-down", "host=127.0.0.1 port=1 dbname=x user=x", "cannot connect"),
        (
            "wrong-password",
            "host=127.0.0.1 port=5433 dbname=nowhere user=nobody password=s3cr3t-value",
            "cannot connect",
        ),
        ("bad-dsn", "this is = not a dsn ===", "LOC2VEC_PG_DSN"),
    ],
)
def test_database_problems_are_one_line(region: str, case: str, dsn: str, named: str) -> None:
    env = {**os.environ, "LOC2VEC_PG_DSN": dsn}
    line = _error_line(
        _cli("render", "--region", region, "--lat", "47.14", "--lon", "9.52", "--out", "/tmp/x.npy", env=env)
    )
    assert named in line and "s3cr3t-value" not in line, line


def test_a_bug_is_one_line_that_points_at_debug(region: str) -> None:
    """An unexpected error (here injected into the tile renderer) is no user error: exit 1, one line that
    says so; `--debug` shows the traceback."""
    args = ["render", "--region", region, "--lat", "47.14", "--lon", "9.52", "--out", "/tmp/x.npy"]
    inject = [sys.executable, "-m", "tests.fixtures.kill_at", "loc2vec.raster.render:render_tile", "raise", "1", "--"]
    proc = subprocess.run([*inject, *args], cwd=REPO, capture_output=True, text=True)
    line = _error_line(proc, status=1)
    assert "unexpected error (a bug): RuntimeError: injected bug" in line and "--debug" in line
    proc = subprocess.run([*inject, "--debug", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "injected bug" in proc.stderr


def test_suite_without_the_peers_extra_is_one_line(region: str, tmp_path: Path) -> None:
    """Without srai (an install without the `peers` extra) `evaluate --suite leakfree` names the extra."""
    import torch

    from loc2vec.core.config import ModelConfig
    from loc2vec.training.model import Encoder

    cfg = ModelConfig()
    torch.save(Encoder(cfg).state_dict(), tmp_path / "model.pt")
    (tmp_path / "model_config.json").write_text(cfg.model_dump_json())
    code = (
        "import runpy, sys; sys.modules['srai'] = None; sys.argv[0] = 'loc2vec';"
        " runpy.run_module('loc2vec.cli', run_name='__main__')"
    )
    args = ["evaluate", "--suite", "leakfree", "--region", region, "--model", str(tmp_path), "--no-track"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    line = _error_line(proc)
    assert "pip install 'loc2vec[peers]'" in line and "srai" in line
