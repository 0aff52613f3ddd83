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


def write_vpc(run_dir: Path, model, cohort, typical, omega, error_model, free,
              n_sim: int = 20, seed: int = 0, options=None) -> None:
    """Visual predictive check: percentiles (10/50/90) of the observed data in time bins
    over the 90% bands of the same percentiles in `n_sim` replicates of the cohort
    simulated (with `options`, a `SolverOptions`) from the fitted population (parameters
    and residual error)."""
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybrid_twin.simulate import simulate

    rng = np.random.default_rng(seed)
    n = cohort.n_patients
    idx = np.array([model.index("param", f) for f in free])
    z_typ = np.asarray(model.to_unconstrained(jnp.asarray(typical)))
    t = np.asarray(cohort.obs_times)
    data = np.asarray(cohort.data_mask) & (np.asarray(cohort.obs_index) == 0)
    edges = np.unique(np.quantile(t[data], np.linspace(0, 1, 13)))
    centers = 0.5 * (edges[1:] + edges[:-1])

    def binned(values):
        # NaN (a simulated patient whose solve failed) is left out of the percentiles
        out = np.full((3, centers.size), np.nan)
        for b in range(centers.size):
            sel = data & (t >= edges[b]) & (t <= edges[b + 1]) & np.isfinite(values)
            if sel.any():
                out[:, b] = np.percentile(values[sel], [10, 50, 90])
        return out

    sims = []
    for _ in range(n_sim):
        z = np.tile(z_typ, (n, 1))
        z[:, idx] += np.asarray(omega)[idx] * rng.standard_normal((n, idx.size))
        theta = model.from_unconstrained(jnp.asarray(z))
        sol = simulate(model, theta, cohort.schedule, cohort.obs_times, cohort.obs_mask,
                       options=options)
        f = np.asarray(sol.observables(model, theta))[..., 0]
        sims.append(binned(f + np.asarray(error_model.sd(f)) * rng.standard_normal(f.shape)))
    sims = np.stack(sims)
    obs = binned(np.asarray(cohort.obs_values))
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for q, color in zip(range(3), ("C0", "C3", "C0")):
        lo, hi = np.nanpercentile(sims[:, q], [5, 95], axis=0)
        ax.fill_between(centers, lo, hi, color=color, alpha=0.2)
        ax.plot(centers, obs[q], color=color, marker="o", ms=3,
                label=("observed 10/90th" if q == 0 else "observed median" if q == 1 else None))
    ax.set_xlabel(f"time ({model.time_unit})")
    ax.set_ylabel(f"{model.observables[0].name} ({model.observables[0].unit})")
    ax.set_title("visual predictive check (bands: 90% of simulated percentiles)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "vpc.png", dpi=110)
    plt.close(fig)


def write_training_curves(run_dir: Path, history: list[dict]) -> None:
    """Training and validation weighted RMSE per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(epochs, [h["train_rmse_weighted"] for h in history], "o-", ms=3, label="train")
    val = [h["val_rmse_weighted"] for h in history]
    if any(np.isfinite(val)):
        ax.plot(epochs, val, "s-", ms=3, label="validation (forecast)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted RMSE (residual / error SD)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=110)
    plt.close(fig)
