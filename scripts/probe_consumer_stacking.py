"""Is the consumer tasks' negative lift the combination's fault? (issue 17, consumer `best_baseline+loc2vec`).

The suite adds loc2vec to the fold's best baseline by concatenating the two and fitting one logistic regression
with one penalty; with a baseline that nearly decides the label (nearest_way scores 0.93 on transport) the 16 extra
columns can cost more than they carry. This probe asks whether loc2vec carries anything about the consumer labels
beyond the baseline under combinations that cannot shrink the baseline, on the suite's own folds, rows and fits
(nothing is chosen by it):

* ``concat``: the suite's best_baseline+loc2vec, fitted again here (a check that the probe reproduces the suite);
* ``noise``: the baseline concatenated with 16 columns of seeded Gaussian noise instead of loc2vec: what 16
  uninformative columns cost (``concat - noise``: what loc2vec's columns carry beyond that cost);
* ``stack0``: stacked generalisation without loc2vec: a logistic regression on the baseline's out-of-fold class
  log-probabilities (the suite's inner spatial folds of the fold's training rows; for the test rows, the baseline
  fitted on all of them);
* ``stack1``: the same with loc2vec beside the log-probabilities. ``stack1 - stack0`` is what loc2vec adds when the
  baseline enters as one calibrated score per class, whatever its width.

Lifts are paired block-bootstrap intervals over the same tested rows (`added_value.paired_lift`).

Usage (after `make run`, which stores the suite inputs and publishes the embeddings the consumer tasks read):
    python scripts/probe_consumer_stacking.py --out probe.consumer_stacking.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.core.config import load_params
from loc2vec.core.numerics import pin_cpu_numerics

TASKS = ("transport", "venue")
COMPARED = (
    ("concat", "baseline"),
    ("noise", "baseline"),
    ("concat", "noise"),
    ("stack0", "baseline"),
    ("stack1", "stack0"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", default="liechtenstein")
    ap.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = ap.parse_args()
    pin_cpu_numerics(load_params(None).compute)  # before numpy and torch load their kernels, as the CLI does

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from loc2vec.cli.project import Project
    from loc2vec.evaluation.added_value import inner_folds, paired_lift
    from loc2vec.evaluation.classifiers import scores
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.suite_inputs import SuiteInputs

    project = Project.load()
    cfg = project.params.evaluate
    ctx = EvaluationContext.from_params(project.params, project.info)
    inputs = SuiteInputs.open(project.paths.suite_inputs(args.region), args.region, cfg, ctx)

    def logreg():
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.logreg_c, max_iter=5000))

    def log_proba(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Class log-probabilities in `classes`' order (a class the model never saw: probability 1e-6)."""
        out = np.full((len(x), len(classes)), np.log(1e-6))
        out[:, np.searchsorted(classes, model.classes_)] = np.log(np.clip(model.predict_proba(x), 1e-6, 1.0))
        return out

    result: dict = {"meta": {"region": args.region, "logreg_c": cfg.logreg_c, "bootstrap": cfg.bootstrap}, "tasks": {}}
    for task in TASKS:
        data, fits = inputs.consumer(task, {})
        if fits is None:
            raise SystemExit(f"{task}: the feature store serves other rows than the suite inputs: run make run first")
        y = data.labels["label"].to_numpy()
        hist, online = data.historical, data.online
        rng = np.random.default_rng(cfg.split.seed)
        noise = rng.standard_normal((len(y), hist["loc2vec"].shape[1]))
        preds: dict[str, list[np.ndarray]] = {k: [] for k in ("baseline", "concat", "noise", "stack0", "stack1")}
        for i, fold in enumerate(data.folds):
            name = fits.chosen["logreg"][i]
            tr, te = fold.train, fold.test
            base_tr, base_te = hist[name][tr], online[name][te]
            inner = inner_folds(data.labels.iloc[tr].reset_index(drop=True), cfg, ctx.radius_m)
            with threadpool_limits(cfg.suite.fit_threads):
                classes = np.unique(y[tr])
                z_tr = np.full((len(tr), len(classes)), np.nan)
                for g in inner:
                    z_tr[g.test] = log_proba(logreg().fit(base_tr[g.train], y[tr][g.train]), base_tr[g.test], classes)
                assert np.isfinite(z_tr).all(), "every row is in one inner fold's test rows"
                z_te = log_proba(logreg().fit(base_tr, y[tr]), base_te, classes)
                l2v_tr, l2v_te = hist["loc2vec"][tr], online["loc2vec"][te]
                preds["baseline"].append(fits.preds[(name, "logreg", i)])
                for key, extra_tr, extra_te in (("concat", l2v_tr, l2v_te), ("noise", noise[tr], noise[te])):
                    model = logreg().fit(np.hstack([base_tr, extra_tr]), y[tr])
                    preds[key].append(model.predict(np.hstack([base_te, extra_te])))
                preds["stack0"].append(logreg().fit(z_tr, y[tr]).predict(z_te))
                stack1 = logreg().fit(np.hstack([z_tr, l2v_tr]), y[tr])
                preds["stack1"].append(stack1.predict(np.hstack([z_te, l2v_te])))
        tested = np.concatenate([f.test for f in data.folds])
        pred = {k: np.concatenate(v) for k, v in preds.items()}
        row: dict = {"chosen_per_fold": fits.chosen["logreg"]}
        row["macro_f1"] = {k: round(scores(y[tested], v)["macro_f1"], 4) for k, v in pred.items()}
        for a, b in COMPARED:
            lift, ci = paired_lift(y[tested], pred[a], pred[b], data.blocks[tested], cfg.bootstrap, cfg.split.seed)
            row[f"{a}-{b}"] = {"lift": round(lift, 4), "ci95": [round(v, 4) for v in ci]}
        result["tasks"][task] = row
        print(task, json.dumps(row), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
