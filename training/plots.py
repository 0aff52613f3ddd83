"""PNG plots of a run: per-patient fits with intervals, predicted vs observed."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(run_dir: Path, model, plot_data: dict, condition_until, n_patients: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "test" if "test" in plot_data else next(iter(plot_data))
    c, pred, lo, hi = plot_data[split]
    n = min(n_patients, c.n_patients)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    t, y = np.asarray(c.obs_times), np.asarray(c.obs_values)
    mask, data = np.asarray(c.obs_mask), np.asarray(c.data_mask)
    k = np.asarray(c.obs_index)
    for i in range(n):
        ax = axes[i // cols][i % cols]
        sel = mask[i] & (k[i] == 0)
        ax.fill_between(t[i][sel], lo[i][sel], hi[i][sel], color="C0", alpha=0.25,
                        label="95% interval")
        ax.plot(t[i][sel], pred[i][sel], color="C0", label="prediction")
        d = sel & data[i]
        ax.plot(t[i][d], y[i][d], "k.", ms=3, label="observed")
        if condition_until is not None:
            ax.axvline(condition_until, color="grey", ls="--", lw=1)
        ax.set_title(f"{split} patient {c.ids[i]}", fontsize=9)
        ax.set_xlabel(f"time ({model.time_unit})")
        ax.set_ylabel(f"{model.observables[0].name} ({model.observables[0].unit})")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "fits.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (cc, pp, _, _) in plot_data.items():
        d = np.asarray(cc.data_mask)
        ax.plot(np.asarray(cc.obs_values)[d], pp[d], ".", ms=2, alpha=0.5, label=name)
    lims = ax.get_xlim()
    ax.plot(lims, lims, "k-", lw=0.8)
    ax.set_xlabel("observed")
    ax.set_ylabel("predicted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "pred_vs_obs.png", dpi=110)
    plt.close(fig)
