"""Peak memory of streaming a cohort from HDF5 through prediction: 10k vs 100k patients.

For each N, a child process writes an N-patient virtual PK cohort (one-compartment,
12 samples, written in slices of 10,000 with `CohortH5Writer`), then a fresh child process
streams it back in slices of 10,000 patients, simulates each slice and keeps only running
summaries. Reported: the streaming process's peak resident memory (ru_maxrss), which stays
flat in N when reading is bounded by the slice.

    python -m benchmarks.hdf5_memory [--sizes 10000 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SLICE = 10_000


def _write(path: str, n: int) -> None:
    from hybrid_twin.data.hdf5 import CohortH5Writer
    from hybrid_twin.data.virtual import DoseSpec, NoiseModel, ScheduleSpec, virtual_cohort
    from hybrid_twin.models import OneCompartment

    model = OneCompartment()
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                        obs_times=(0.25, 0.5, 1, 2, 3, 4, 6, 8, 10, 12, 18, 24))
    with CohortH5Writer(path, observable_units=("mg/L",), time_unit="h") as w:
        for k, start in enumerate(range(0, n, SLICE)):
            part = virtual_cohort(model, min(SLICE, n - start), schedule=spec,
                                  noise=NoiseModel("proportional", proportional_sd=0.1),
                                  seed=k).cohort
            ids = tuple(f"p{start + i}" for i in range(part.n_patients))
            w.append(dataclasses.replace(part, ids=ids))


def _stream(path: str) -> dict:
    import jax
    import numpy as np

    from hybrid_twin import simulate
    from hybrid_twin.data import iter_cohort_h5
    from hybrid_twin.models import OneCompartment

    model = OneCompartment()
    theta = None
    total, sse, n = 0.0, 0.0, 0
    t = time.perf_counter()
    for part in iter_cohort_h5(path, SLICE):
        if theta is None or theta.shape[0] != part.n_patients:
            theta = np.tile(model.typical_params(), (part.n_patients, 1))
        sol = simulate(model, theta, part.schedule, part.obs_times, part.obs_mask)
        pred = np.asarray(sol.observables(model, theta))[..., 0]
        obs = np.asarray(part.obs_values)
        sse += float(np.sum((pred - obs) ** 2))
        total += float(pred.sum())
        n += part.n_patients
    jax.block_until_ready(sol.ys)
    return {"patients": n, "stream_s": round(time.perf_counter() - t, 2),
            "rmse_typical": (sse / (n * obs.shape[1])) ** 0.5,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from benchmarks.common import emit

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = os.path.join(tmp, f"cohort_{n}.h5")
            subprocess.run([sys.executable, "-m", "benchmarks.hdf5_memory", "--_write", path,
                            str(n)], check=True)
            res = subprocess.run([sys.executable, "-m", "benchmarks.hdf5_memory", "--_stream",
                                  path], check=True, capture_output=True, text=True)
            rows[n] = {**json.loads(res.stdout.strip().splitlines()[-1]),
                       "file_mb": round(os.path.getsize(path) / 2**20, 1)}
    sizes = sorted(rows)
    emit({"benchmark": "hdf5_memory", "slice_patients": SLICE, "results": rows,
          "peak_rss_ratio_largest_over_smallest": round(
              rows[sizes[-1]]["peak_rss_mb"] / rows[sizes[0]]["peak_rss_mb"], 3)}, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_write":
        _write(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_stream":
        print(json.dumps(_stream(sys.argv[2])))
    else:
        main()
