"""The suite's chart: macro-F1 per featureset and classifier, with 95% block-bootstrap intervals, per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def suite_chart(result: dict[str, Any], out: Path) -> Path:
    """Write a PNG with one panel per task: a bar per featureset and classifier, its interval as an error bar.

    Args:
        result: a suite result (evaluation/suite.py).
        out: the PNG to write.

    Returns:
        `out`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    # 5 in per panel: a lift line naming srai_contextual_counts ran into the next panel's title at 4.2
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 4.6), squeeze=False, sharex=True)
    for ax, (task, table) in zip(axes[0], tasks.items(), strict=True):
        names = [n for n in table if not n.startswith("lift")]
        kinds = list(table[names[0]])
        ci = result["meta"]["tasks"][task].get("bootstrap", {}).get("macro_f1_ci95", {})
        height = 0.8 / len(kinds)
        for j, kind in enumerate(kinds):
            f1 = np.asarray([table[n][kind]["macro_f1"] for n in names])
            lo_hi = np.asarray([ci.get(n, {}).get(kind, [v, v]) for n, v in zip(names, f1, strict=True)])
            err = np.abs(np.stack([f1 - lo_hi[:, 0], lo_hi[:, 1] - f1]))
            ax.barh(np.arange(len(names)) + j * height, f1, height, xerr=err, label=kind, capsize=2)
        ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize=8)
        ax.invert_yaxis()
        note = "\n".join(
            f"{key.replace('_', ' ')} {k}: {v['lift']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
            f" over {v['best_baseline']}"
            for key in table
            if key.startswith("lift")
            for k, v in table[key].items()
        )
        ax.set_title(f"{task}\n{note}", fontsize=8)
        ax.set_xlabel("macro-F1")
        ax.set_xlim(0, 1)
    axes[0][0].legend(fontsize=8, loc="lower right")
    meta = result["meta"]
    where = meta["region"] + (f" (trained on {', '.join(meta['train_regions'])})" if meta["train_regions"] else "")
    fig.suptitle(f"loc2vec {meta['suite']} suite: {where}. Map data © OpenStreetMap contributors", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the last panel's lift lines reach past the figure's edge
    plt.close(fig)
    return out
