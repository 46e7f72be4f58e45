"""Prefect flows (flows/) against real DVC, PostgreSQL and a Prefect test server.

The pipeline runs in a temporary git + DVC repository whose dvc.yaml mirrors the project's ingest stage
(`loc2vec fetch` + `loc2vec ingest`, foreach pipeline.regions) plus a report stage that writes metrics
like `loc2vec evaluate` and a training summary like `loc2vec train`, naming a run of the repository's
real MLflow store. The database is reached through a TCP proxy that drops its first connection — a real
`server closed the connection unexpectedly` from libpq — so the first attempt of the first stage fails
transiently, and the retry goes through. The stage graph and its selection are checked on the project's
own dvc.yaml (9 stages: ingest@R, sample@R, render@R, train, promote, embed@R, publish@R, suite_inputs@R,
evaluate@R).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TEST_BBOX
from .fixtures.project import load_project
from .prefect_harness import prefect_harness  # noqa: F401  (the session's Prefect test server)

DVC_YAML = """\
stages:
  ingest:
    foreach: ${pipeline.regions}
    do:
      cmd:
        - loc2vec fetch --region ${item} --out data/osm/${item}.osm.pbf
        - loc2vec ingest --region ${item} --pbf data/osm/${item}.osm.pbf --record data/ingest/${item}.json
      params:
        - regions.registry.${item}
      outs:
        - data/osm/${item}.osm.pbf
        - data/ingest/${item}.json:
            cache: false
  report:
    cmd: python report.py
    deps:
      - data/ingest
      - report.py
    outs:
      - data/evaluate:
          cache: false
      - data/model/summary.json:
          cache: false
"""

REPORT_PY = """\
import json, pathlib
for record in sorted(pathlib.Path("data/ingest").glob("*.json")):
    region = json.loads(record.read_text())["region"]
    metrics = {{"logreg": {{"accuracy": 0.61, "macro_f1": 0.55}}, "hgb": {{"accuracy": 0.52, "macro_f1": 0.47}}}}
    out = pathlib.Path("data/evaluate") / (region + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({{"tasks": {{"transport": {{"loc2vec": metrics}}}}, "meta": {{}}}}))
# A fan-out inside a stage, as `loc2vec embed` does: under the pipeline flow it must find the flow's API.
from loc2vec.core.config import load_params
from loc2vec.orchestration.runners import map_tasks, runner_kind
cfg = load_params().orchestrate
squares = {{}}
map_tasks(lambda x: x * x, [{{"x": i}} for i in range(3)], squares.__setitem__, flow_name="loc2vec-probe",
          run_name="probe", task_name="square", task_run_name="square-{{x}}", cfg=cfg)
pathlib.Path("data/model").mkdir(parents=True, exist_ok=True)
pathlib.Path("data/model/summary.json").write_text(json.dumps(
    {{"best_val_triplet_accuracy": 0.9, "best_step": 5, "steps": 10, "stopped": "max_steps", "mlflow_run_id": "{run_id}",
      "runner": runner_kind(cfg), "squares": [squares[i] for i in range(3)]}}))
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


class DropFirstProxy:
    """A TCP proxy to PostgreSQL that closes its first `drop` connections at once (as a server that went
    away does) and forwards every later one."""

    def __init__(self, target: tuple[str, int], drop: int = 1):
        self.target, self.drop = target, drop
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections <= self.drop:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def refresh_pbf(tmp_path_factory: pytest.TempPathFactory, small_pbf: Path) -> Path:
    """A smaller cut (Vaduz centre) of the test extract: a second, different extract."""
    west, south, east, north = TEST_BBOX
    out = tmp_path_factory.mktemp("osm-refresh") / "vaduz.osm.pbf"
    bbox = f"{west + 0.02},{south},{east - 0.01},{south + 0.02}"
    subprocess.run(
        ["osmium", "extract", "-b", bbox, "--set-bounds", "-s", "complete_ways", "-o", str(out), str(small_pbf)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real MLflow store (sqlite) holding one run; each test repository gets a copy as its mlflow.db."""
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{base / 'mlflow.db'}")
    experiment = client.create_experiment("loc2vec-flows-test", artifact_location=(base / "mlruns").as_uri())
    # a later experiment too: the link must name the run's own, not the newest
    client.create_experiment("loc2vec-flows-other", artifact_location=(base / "mlruns").as_uri())
    run = client.create_run(experiment)
    return {"db": str(base / "mlflow.db"), "experiment_id": str(experiment), "run_id": run.info.run_id}


@pytest.fixture()
def dvc_repo(
    tmp_path: Path,
    project: Path,
    region: str,
    small_pbf: Path,
    mlflow_run: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """A git + DVC repository with the test project's params (plus the test region and a fast retry policy)
    and a local DVC remote; LOC2VEC_PARAMS points at it for the flows and the stages they run."""
    root = tmp_path / "repo"
    root.mkdir()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["regions"]["registry"]["test_li"] = {"source": str(small_pbf), "sha256": _sha256(small_pbf)}
    params["regions"]["registry"]["test_bad"] = {"source": str(small_pbf), "sha256": "0" * 64}
    params["pipeline"]["regions"] = ["liechtenstein"]  # the flow's `regions` replaces it
    params["orchestrate"].update(
        {"retries": 2, "retry_backoff_s": 1.0, "retry_jitter_factor": 0.0, "lock_timeout_s": 0}
    )
    text = "# test pipeline params\n" + yaml.safe_dump(params, sort_keys=False)
    (root / "params.yaml").write_text(text.replace("pipeline:\n", "pipeline:\n  # the regions DVC runs\n"))
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "report.py").write_text(REPORT_PY.format(run_id=mlflow_run["run_id"]))
    (root / "loc2vec").mkdir()
    (root / ".gitignore").write_text("/data/.locks/\n/data/scratch/\n/mlflow.db\n")
    shutil.copyfile(mlflow_run["db"], root / "mlflow.db")
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.org")
    _git(root, "config", "user.name", "test")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "remote", "add", "-d", "local", str(tmp_path / "remote")],
        cwd=root,
        check=True,
    )
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    monkeypatch.setenv("LOC2VEC_PARAMS", str(root / "params.yaml"))
    monkeypatch.delenv("LOC2VEC_TASK_RUNNER", raising=False)
    yield root


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:  # sort and limit explicit: the sync client sends None otherwise
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    return {r.name: r for r in runs}


def _artifact(flow_run_id, key: str) -> dict:
    """The artifact a flow run created under `key`. A raw request: Prefect 3.8.8's client sends null for the
    filters it leaves out, which this server rejects (422), and an empty task-run filter would demand a task."""
    from prefect.client.orchestration import get_client

    body = {
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [str(flow_run_id)]}},
        "sort": "UPDATED_DESC",
        "limit": 1,
        "offset": 0,
    }
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json=body).json()
    assert found, f"no artifact {key!r} of flow run {flow_run_id}"
    return found[0]


def _flow_runs(name: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    body = {"flow_runs": {"name": {"any_": [name]}}, "sort": "ID_DESC", "limit": 10, "offset": 0}
    with get_client(sync_client=True) as client:
        return client.request("POST", "/flow_runs/filter", json=body).json()


# ---------------------------------------------------------------- the pipeline flow


@pytest.mark.usefixtures("prefect_harness")
def test_transient_failure_is_retried_and_the_pipeline_succeeds(
    dvc_repo: Path, mlflow_run: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import ARTIFACT_KEY, pipeline

    params_before = (dvc_repo / "params.yaml").read_text()
    proxy = DropFirstProxy(("127.0.0.1", 5433))
    dsn = os.environ["LOC2VEC_PG_DSN"].replace("port=5433", f"port={proxy.port}")
    # The generated pgpass file names the server's port; a DSN through a proxy carries its password itself.
    dsn += f" password={load_project().info.password}"
    monkeypatch.setenv("LOC2VEC_PG_DSN", dsn)
    monkeypatch.setenv("PGSSLMODE", "disable")  # one TCP connection per connect: the first one is the dropped one
    try:
        state = pipeline(regions=["test_li"], return_state=True)
    finally:
        proxy.close()
    assert state.is_completed(), state.message
    summary = state.result()

    # The first attempt of ingest@test_li met the dropped connection; the retry went through the proxy.
    assert [s["stage"] for s in summary["stages"]] == ["ingest@test_li", "report"], "regions → exactly these stages"
    ingest, report = summary["stages"]
    assert ingest["attempts"] == 2 and ingest["ran"] and report["attempts"] == 1 and report["ran"]
    assert proxy.connections >= 2
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["ingest@test_li"].run_count == 2 and runs["ingest@test_li"].state.is_completed()

    # regions: written to params.yaml in place (comments and the list's block style kept), so DVC ran
    # exactly those regions.
    params_after = (dvc_repo / "params.yaml").read_text()
    assert "# the regions DVC runs" in params_after and "  regions:\n  - test_li\n" in params_after
    before, after = params_before.splitlines(), params_after.splitlines()
    assert [a for a in before if a not in after] == ["  - liechtenstein"]
    assert [a for a in after if a not in before] == ["  - test_li"]
    assert json.loads((dvc_repo / "data" / "ingest" / "test_li.json").read_text())["region"] == "test_li"
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "-q"], cwd=dvc_repo)
    assert status.returncode == 0, "dvc.lock records the run: the pipeline is up to date"

    # The summary: metrics table, MLflow link (the run's experiment, from the MLflow store), and the same as a
    # Prefect artifact.
    experiment, run_id = mlflow_run["experiment_id"], mlflow_run["run_id"]
    assert summary["mlflow"]["url"] == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
    assert summary["metrics"]["test_li"]["transport"]["loc2vec"]["logreg"]["macro_f1"] == 0.55
    assert "| test_li | transport | loc2vec | 0.550 | 0.610 | 0.470 | 0.520 |" in summary["markdown"]
    artifact = _artifact(state.state_details.flow_run_id, ARTIFACT_KEY)
    assert artifact["type"] == "markdown"
    assert summary["mlflow"]["url"] in artifact["data"] and "| test_li | transport | loc2vec |" in artifact["data"]

    # The report stage fanned out over Prefect threads, reporting to this flow's server (no server of its own).
    assert summary["training"]["runner"] == "threads" and summary["training"]["squares"] == [0, 1, 4]
    assert _flow_runs("probe"), "the stage's fan-out flow run is on the pipeline's Prefect server"

    # Again: DVC finds nothing changed, every stage is skipped in one attempt.
    again = pipeline()
    assert [(s["ran"], s["attempts"]) for s in again["stages"]] == [(False, 1), (False, 1)]


@pytest.mark.usefixtures("prefect_harness")
def test_deterministic_failure_is_not_retried(dvc_repo: Path) -> None:
    from flows.pipeline import pipeline

    state = pipeline(regions=["test_bad"], stages=["ingest"], return_state=True)
    assert state.is_failed()
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["ingest@test_bad"].run_count == 1, "a checksum mismatch is not transient: no retry"
    assert runs["ingest@test_bad"].state.is_failed(), "failed on its first attempt, no retry scheduled"
    assert "checksum mismatch" in str(state.message) + str(runs["ingest@test_bad"].state.message)

    bad = pipeline(stages=["no_such_stage"], return_state=True)
    assert bad.is_failed() and "no DVC stage 'no_such_stage'" in str(bad.message)


# Holds the test project's pipeline lock until a line arrives on stdin, then lets go and says so.
HOLDER = """\
import sys
from flows.lock import exclusive
from loc2vec.core.config import load_params
from loc2vec.core.paths import ProjectPaths
with exclusive(ProjectPaths.from_params(load_params()).lock("pipeline"), timeout_s=0):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _holder() -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.usefixtures("prefect_harness")
def test_two_runs_never_hold_the_lock_at_once(dvc_repo: Path) -> None:
    from flows.lock import LockBusy, exclusive
    from flows.pipeline import pipeline

    lock = load_project().paths.lock("pipeline")
    holder = _holder()
    try:
        with pytest.raises(LockBusy, match=f"pid {holder.pid}"), exclusive(lock, timeout_s=0):
            pass
        state = pipeline(stages=["report"], return_state=True)  # orchestrate.lock_timeout_s: 0 → fails at once
        assert state.is_failed() and "another run holds" in str(state.message)
    finally:
        holder.kill()
        holder.wait()

    # A waiting run gets the lock once the holder lets go; re-entering it in one call chain is free.
    holder = _holder()
    assert holder.stdin is not None and holder.stdout is not None
    with pytest.raises(LockBusy), exclusive(lock, timeout_s=0):  # held now
        pass
    release = threading.Timer(0.5, lambda: (holder.stdin.write("go\n"), holder.stdin.flush()))
    release.start()
    try:
        with exclusive(lock, timeout_s=60), exclusive(lock, timeout_s=0):
            assert holder.stdout.readline().strip() == "released", "the lock came only after the holder let go"
        assert holder.wait(timeout=60) == 0, "the holder ended by itself, after releasing"
    finally:
        release.cancel()
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.usefixtures("prefect_harness")
def test_refresh_osm_versions_the_extract_and_runs_the_pipeline_only_on_change(
    dvc_repo: Path, refresh_pbf: Path
) -> None:
    from flows.refresh import locked_md5, refresh_osm
    from loc2vec.osm.db import cursor

    sha = _sha256(refresh_pbf)
    try:
        first = refresh_osm(region="test_refresh", source=str(refresh_pbf), sha256=sha)
        assert first["changed"] and first["md5_before"] is None and first["ingest"]["ran"]
        params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
        assert params["regions"]["registry"]["test_refresh"] == {"source": str(refresh_pbf), "sha256": sha}
        assert "test_refresh" in params["pipeline"]["regions"]
        md5 = locked_md5(dvc_repo / "dvc.lock", "data/osm/test_refresh.osm.pbf")
        assert md5 and (dvc_repo / "data" / "osm" / "test_refresh.osm.pbf").read_bytes() == refresh_pbf.read_bytes()
        remote = dvc_repo.parent / "remote" / "files" / "md5" / md5[:2] / md5[2:]
        assert remote.is_file(), "dvc push put the extract in the remote"
        stages = [s["stage"] for s in first["pipeline"]["stages"]]
        assert stages == ["ingest@liechtenstein", "ingest@test_refresh", "report"][-len(stages) :]
        assert "ingest@test_refresh" in stages and "report" in stages, "the pipeline ran after the change"

        copy = refresh_pbf.parent / "same-data.osm.pbf"
        shutil.copyfile(refresh_pbf, copy)
        second = refresh_osm(region="test_refresh", source=str(copy), sha256=sha)
        assert not second["changed"] and "pipeline" not in second, "same data from elsewhere: nothing to run"

        with pytest.raises(Exception, match="checksum mismatch"):
            refresh_osm(region="test_refresh", source=str(copy), sha256="f" * 64)
        assert (
            yaml.safe_load((dvc_repo / "params.yaml").read_text())["regions"]["registry"]["test_refresh"]["sha256"]
            == sha
        ), "a failed verification changes nothing"
    finally:
        info = load_project().info
        with cursor(info) as cur:
            cur.execute("DROP SCHEMA IF EXISTS test_refresh CASCADE")
            cur.execute(f"DELETE FROM {info.meta_schema}.imports WHERE region = 'test_refresh'")


@pytest.mark.usefixtures("prefect_harness")
def test_publish_flow_fails_fast_without_published_data(dvc_repo: Path) -> None:
    from flows.publish import publish

    state = publish(return_state=True)
    assert state.is_failed() and "no offline data" in str(state.message)
    assert _task_runs(state.state_details.flow_run_id)["materialize-incremental"].run_count == 1


# ---------------------------------------------------------------- pieces, no server


@pytest.mark.parametrize(
    ("text", "transient"),
    [
        ('connection to server at "127.0.0.1", port 5433 failed: Connection refused', True),
        ("server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally", True),
        ("psycopg2.OperationalError: terminating connection due to administrator command", True),
        ("psycopg.OperationalError: the database system is starting up", True),
        ("loc2vec ingest: error: cannot connect to PostgreSQL at postgresql://loc2vec@127.0.0.1:5433/loc2vec", True),
        ("ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
        ("loc2vec ingest: error: checksum mismatch for region 'x'", False),
        ("loc2vec train: error: params.yaml section 'train': unknown keys ['lrr']", False),
        ("ConfigError: orchestrate.task_runner must be one of ...", False),
        ("ValueError: cannot reshape array of size 3", False),
    ],
)
def test_transient_classification(text: str, transient: bool) -> None:
    from loc2vec.orchestration.transient import is_transient, is_transient_text

    assert is_transient_text(text) is transient
    assert is_transient(RuntimeError(text)) is transient


def test_transient_exceptions() -> None:
    import psycopg2

    from loc2vec.core.errors import ConfigError
    from loc2vec.orchestration.transient import is_transient

    try:
        psycopg2.connect(host="127.0.0.1", port=1, dbname="x", user="x", connect_timeout=2)
    except psycopg2.OperationalError as exc:
        assert is_transient(exc)
        try:
            raise RuntimeError("import failed") from exc
        except RuntimeError as wrapped:
            assert is_transient(wrapped), "found in the exception chain"
    assert is_transient(ConnectionResetError())
    assert not is_transient(ConfigError("could not connect: bad port in params"))


def _dag_dot(regions: tuple[str, ...]) -> str:
    """`dvc dag --dot` of dvc.yaml's 9 stages over these regions, as DVC writes it."""
    per_region = ("ingest", "sample", "render")
    nodes = [f"{s}@{r}" for s in per_region for r in regions] + ["train", "promote"]
    nodes += [f"{s}@{r}" for s in ("embed", "publish", "suite_inputs", "evaluate") for r in regions]
    edges = []
    for r in regions:
        edges += [
            (f"ingest@{r}", f"sample@{r}"),
            (f"ingest@{r}", f"render@{r}"),
            (f"ingest@{r}", "promote"),
            (f"ingest@{r}", f"embed@{r}"),
            (f"sample@{r}", f"render@{r}"),
            (f"sample@{r}", "train"),
            (f"render@{r}", "train"),
            (f"render@{r}", "promote"),
            (f"render@{r}", f"embed@{r}"),
        ]
    edges.append(("train", "promote"))
    for r in regions:
        edges += [("promote", f"embed@{r}"), (f"embed@{r}", f"publish@{r}"), (f"publish@{r}", f"evaluate@{r}")]
        edges += [(f"ingest@{r}", f"suite_inputs@{r}"), (f"render@{r}", f"suite_inputs@{r}")]
        edges += [(f"suite_inputs@{r}", f"evaluate@{r}")]
        edges += [(f"render@{r}", f"evaluate@{r}"), ("promote", f"evaluate@{r}")]
    lines = [f'"{n}";' for n in nodes] + [f'"{a}" -> "{b}";' for a, b in edges]
    return "strict digraph {\n" + "\n".join(lines) + "\n}\n"


def test_stage_graph_order_and_selection() -> None:
    from flows.dvc_stages import StageGraph
    from loc2vec.core.errors import Loc2VecError

    g = StageGraph.from_dot(_dag_dot(("a", "b")))
    order = g.select()
    assert order == [
        "ingest@a",
        "ingest@b",
        "sample@a",
        "sample@b",
        "render@a",
        "render@b",
        "train",
        "promote",
        "embed@a",
        "embed@b",
        "publish@a",
        "publish@b",
        "suite_inputs@a",
        "suite_inputs@b",
        "evaluate@a",
        "evaluate@b",
    ]
    assert len(order) == 16 and len({s.split("@")[0] for s in order}) == 9, "9 stages, 7 of them per region"
    assert g.select(from_stage="train") == [
        "train",
        "promote",
        "embed@a",
        "embed@b",
        "publish@a",
        "publish@b",
        "evaluate@a",
        "evaluate@b",
    ]
    assert g.select(from_stage="promote") == g.select(from_stage="train")[1:]
    assert g.select(from_stage="sample@b") == [
        "sample@b",
        "render@b",
        "train",
        "promote",
        "embed@a",
        "embed@b",
        "publish@a",
        "publish@b",
        "suite_inputs@b",  # the consumer baselines' cell tiles come from render@b's metatiles
        "evaluate@a",
        "evaluate@b",
    ]
    assert g.select(from_stage="publish@a") == ["publish@a", "evaluate@a"]
    assert g.select(stages=["embed", "publish"]) == ["embed@a", "embed@b", "publish@a", "publish@b"]
    assert g.select(stages=["ingest@b"], from_stage="ingest") == ["ingest@b"]
    assert g.deps("promote") == {"ingest@a", "ingest@b", "render@a", "render@b", "train"}
    with pytest.raises(Loc2VecError, match="no DVC stage 'no_such_stage'"):
        g.select(stages=["no_such_stage"])

    cycle = StageGraph.from_dot('strict digraph {\n"a";\n"b";\n"c";\n"a" -> "b";\n"b" -> "c";\n"c" -> "b";\n}\n')
    with pytest.raises(Loc2VecError, match="cycle: b → c → b|cycle: c → b → c"):
        cycle.select()


def test_stage_graph_of_the_project_dvc_yaml(tmp_path: Path) -> None:
    """The project's dvc.yaml, as `dvc dag` expands it for two regions: the 9 stages in dependency order."""
    from flows.dvc_stages import StageGraph, stage_env, stage_graph

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"]["regions"] = ["liechtenstein", "andorra"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copyfile(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    graph = stage_graph(tmp_path, stage_env())
    expected = StageGraph.from_dot(_dag_dot(("liechtenstein", "andorra")))
    assert graph.select() == expected.select()
    assert set(graph.graph.edges) == set(expected.graph.edges)


def test_summary_lists_only_the_runs_regions(tmp_path: Path) -> None:
    """data/evaluate/<R>.json of the pipeline's regions only: a file an earlier run left for another region
    is not a result of this run."""
    from flows.pipeline import read_metrics, summarize
    from loc2vec.core.config import OrchestrateConfig
    from loc2vec.core.paths import ProjectPaths

    paths = ProjectPaths(root=tmp_path)
    tasks = {"transport": {"loc2vec": {"logreg": {"accuracy": 0.6, "macro_f1": 0.5}}}}
    for region in ("ran", "earlier"):
        paths.evaluation(region).parent.mkdir(parents=True, exist_ok=True)
        paths.evaluation(region).write_text(json.dumps({"tasks": tasks, "meta": {}}))
    assert read_metrics(paths, ["ran", "not_evaluated"]) == {"ran": tasks}
    summary = summarize(paths, ["ran"], [], OrchestrateConfig())
    assert summary["metrics"] == {"ran": tasks}
    assert "| ran | transport | loc2vec | 0.500 |" in summary["markdown"] and "earlier" not in summary["markdown"]
    assert summary["mlflow"] == {} and "No training summary yet" in summary["markdown"]
    assert "Embeddings evaluated" not in summary["markdown"] and "Champion gate" not in summary["markdown"]

    # The summary names the model version each evaluation read, and the champion gate's decision.
    model = {"name": "loc2vec-encoder", "version": "1"}
    paths.evaluation("ran").write_text(json.dumps({"tasks": tasks, "meta": {"model": model}}))
    paths.promotion.write_text(
        json.dumps(
            {
                "candidate_version": "3",
                "previous_champion_version": "1",
                "champion_version": "1",
                "promoted": False,
                "candidate_score": 0.3989,
                "champion_score": 0.4041,
            }
        )
    )
    md = summarize(paths, ["ran"], [], OrchestrateConfig())["markdown"]
    assert "Embeddings evaluated: ran: loc2vec-encoder version 1." in md
    assert (
        "Champion gate: candidate version 3 scored 0.399 against champion version 1's 0.404 "
        "(not promoted: the champion stays version 1)." in md
    )
    assert "the gate did not run here" not in md  # the embeddings evaluated are the champion's

    # A fresh clone: the committed decision promoted version 3 of another checkout's registry, while this one's
    # registry holds version 1 only (DVC did not re-run the gate): the line says which model was evaluated here.
    decision = {**json.loads(paths.promotion.read_text()), "model_name": "loc2vec-encoder"}
    paths.promotion.write_text(json.dumps({**decision, "champion_version": "3", "promoted": True}))
    md = summarize(paths, ["ran"], [], OrchestrateConfig())["markdown"]
    assert (
        "(promoted: version 3 is the champion). That is the decision recorded in promotion.json (the gate did not "
        "run here: DVC found its inputs unchanged); the embeddings evaluated here are of loc2vec-encoder version 1 "
        "of this checkout's registry." in md
    )

    # A retrain that reproduced the champion's weights byte for byte: the gate did not score it.
    same = {"candidate_version": "5", "previous_champion_version": "3", "champion_version": "3", "promoted": False}
    paths.promotion.write_text(json.dumps({**same, "candidate_score": None, "same_weights_as_champion": True}))
    md = summarize(paths, ["ran"], [], OrchestrateConfig())["markdown"]
    assert (
        "Champion gate: candidate version 5 has the weights of champion version 3 (not scored; the champion stays "
        "version 3)." in md
    )

    # The first version is the champion with nothing to compare; the lifts' intervals read as numbers.
    paths.promotion.write_text(
        json.dumps(
            {
                "candidate_version": "1",
                "previous_champion_version": "1",
                "champion_version": "1",
                "promoted": False,
                "candidate_score": 0.3867,
                "champion_score": 0.3867,
            }
        )
    )
    lift = {"best_baseline": "nearest_way", "lift": -0.0127, "ci95": [-0.02250771221803792, -0.004749217222356231]}
    tasks["transport"]["lift"] = {"logreg": lift, "hgb": {**lift, "lift": 0.003, "ci95": [-0.0116, 0.0182]}}
    paths.evaluation("ran").write_text(json.dumps({"tasks": tasks, "meta": {"model": model}}))
    md = summarize(paths, ["ran"], [], OrchestrateConfig())["markdown"]
    assert "Champion gate: version 1 is the champion, with nothing to compare it with (its gate score 0.387)." in md
    paths.promotion.write_text(json.dumps({**json.loads(paths.promotion.read_text()), "candidate_score": None}))
    md = summarize(paths, ["ran"], [], OrchestrateConfig())["markdown"]
    assert "Champion gate: version 1 is the champion, with nothing to compare it with (not scored)." in md
    assert (
        "| ran | transport | lift | -0.013 [-0.023, -0.005] over nearest_way | | 0.003 [-0.012, 0.018] over nearest_way | |"
        in md
    )


def test_stage_output_keeps_lines_and_throttles_progress_redraws() -> None:
    """A stage's tqdm bar redraws its line with '\\r' several times a second: the log keeps every real line,
    one redraw per progress_every_s and the bar's final state, from a real child process's pipe."""
    from flows.dvc_stages import output_lines

    script = (
        "import sys; w = sys.stdout.buffer.write\n"
        "w(b'start\\n')\n"
        "for i in range(1, 101): w(b'\\rtrain %3d%%' % i); sys.stdout.flush()\n"
        "w(b'\\n'); w(b'windows line\\r\\n'); w('caf\\u00e9 \\u2713\\n'.encode()); w(b'\\n\\rtail 1\\rtail 2')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    ticks = iter(range(10_000))  # one second per redraw seen
    lines = list(output_lines(proc.stdout, progress_every_s=40, clock=lambda: float(next(ticks))))
    assert proc.wait() == 0
    redraws = [line for line in lines if line.startswith("train")]
    assert 2 <= len(redraws) <= 4 and redraws[0] == "train   1%" and redraws[-1] == "train 100%", redraws
    assert [line for line in lines if not line.startswith("train")] == ["start", "windows line", "café ✓", "tail 2"]


def test_params_edits_keep_comments_and_refuse_surprises(tmp_path: Path) -> None:
    from flows.params_edit import ParamsEditError, edit, set_pipeline_regions, set_region_source

    path = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", path)
    original = path.read_text()
    assert set_pipeline_regions(path, ["liechtenstein", "andorra"]) and not set_pipeline_regions(
        path, ["liechtenstein", "andorra"]
    )
    assert set_region_source(path, "bremen", "https://example.org/bremen-latest.osm.pbf#x", "ab" * 32)
    new = path.read_text()
    changed = [line for line in new.splitlines() if line not in original.splitlines()]
    assert changed[:3] == [
        "    bremen:",
        '      source: "https://example.org/bremen-latest.osm.pbf#x"',
        f"      sha256: {'ab' * 32}",
    ]
    assert len(changed) == 4 and changed[3].startswith("  regions: [liechtenstein, andorra]"), changed
    assert [line for line in original.splitlines() if line not in new.splitlines()] == ["  regions: [liechtenstein]"]
    assert new.count("\n\n") == original.count("\n\n") and "bremen:" in new.split("\n\ndb:")[0], "before the gap"
    params = yaml.safe_load(new)
    assert params["pipeline"]["regions"] == ["liechtenstein", "andorra"]
    assert params["regions"]["registry"]["bremen"]["sha256"] == "ab" * 32
    with pytest.raises(ParamsEditError):
        edit(path, {("db",): 1})
    assert path.read_text() == new, "a refused edit leaves the file as it was"

    # A block list keeps its style and the comments on and after it; an edit that would drop one is refused.
    block = tmp_path / "block.yaml"
    text = "pipeline:\n  regions:\n  - a  # the first\n  - b  # the second\n  # after the list\n\nnext: 1\n"
    block.write_text(text)
    assert set_pipeline_regions(block, ["a", "b", "c"])
    assert block.read_text() == text.replace("  # after", "  - c\n  # after")
    block.write_text(text)
    with pytest.raises(ParamsEditError, match="the second"):
        set_pipeline_regions(block, ["a"])
    assert block.read_text() == text


def test_deployment_schedules_are_declared() -> None:
    from flows.deployments import deployments, schedules
    from loc2vec.core.config import load_params

    params = load_params()
    cfg = params.orchestrate
    deps = {d.name: d for d in deployments(params)}
    assert set(deps) == {"weekly-refresh", "daily-publish", "on-demand"}
    refresh, publish = deps["weekly-refresh"].schedules[0].schedule, deps["daily-publish"].schedules[0].schedule
    assert (refresh.cron, refresh.timezone) == (cfg.refresh_cron, cfg.timezone)
    assert (publish.cron, publish.timezone) == (cfg.publish_cron, cfg.timezone)
    assert refresh.cron.split()[-1] != "*" and publish.cron.split()[2:] == ["*", "*", "*"], "weekly and daily"
    assert not deps["on-demand"].schedules
    assert all(d.concurrency_limit == 1 for d in deps.values()), "one active run per deployment"
    assert deps["weekly-refresh"].entrypoint == "flows.refresh.refresh_osm"

    # prefect.yaml (for a worker) declares the same deployments and schedules.
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    by_name = {d["name"]: d for d in declared}
    for name, spec in schedules(params).items():
        d = by_name[name]
        crons = [(s["cron"], s["timezone"]) for s in d.get("schedules") or []]
        assert crons == ([(spec["cron"], spec["timezone"])] if spec["cron"] else []), name
        module, fn = d["entrypoint"].split(":")
        assert module == f"flows/{spec['flow'].fn.__module__.split('.')[-1]}.py" and fn == spec["flow"].fn.__name__
        assert d["concurrency_limit"]["limit"] == 1


def test_flow_commands_parse() -> None:
    """`loc2vec flow pipeline|refresh|publish|serve` replace `python -m flows.*`."""
    from loc2vec.cli.flows import cmd_flow
    from loc2vec.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["flow", "pipeline", "--regions", "a,b", "--from-stage", "train", "--no-lookup"])
    assert (args.func, args.flow, args.regions, args.from_stage, args.no_lookup) == (
        cmd_flow,
        "pipeline",
        "a,b",
        "train",
        True,
    )
    assert parser.parse_args(["flow", "refresh", "--region", "x", "--no-push"]).no_push
    assert parser.parse_args(["flow", "publish", "--online-store", "postgres"]).online_store == "postgres"
    assert parser.parse_args(["flow", "serve"]).func is cmd_flow
    for module in ("pipeline", "refresh", "publish", "deployments"):
        source = (REPO / "flows" / f"{module}.py").read_text()
        assert "__main__" not in source and "argparse" not in source, f"flows/{module}.py: no second command line"
