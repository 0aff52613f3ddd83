"""The GPU benchmark script runs end to end at a tiny size on CPU (interpret mode), so it is
ready when a GPU is: every variant reports, peers that are absent are skipped with a
reason, float32 results agree with the float64 reference."""

import json

from benchmarks import gpu_ensemble


def test_gpu_ensemble_benchmark_runs_small_on_cpu(capsys):
    gpu_ensemble.main(["--n", "16", "--gn-n", "16", "--calib-n", "16", "--ref-n", "4"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {x["variant"]: x for x in lines}
    for name in ("diffrax", "kernel_rk4", "kernel_tsit5", "kernel_rk4_glucose_only"):
        assert by[name]["run_s"] > 0 and by[name]["max_rel_diff_vs_f64_cpu"] < 1e-3, name
    for name in ("cuda_rk4", "torchdiffeq_rk4", "torchdiffeq_dopri5"):
        assert "run_s" in by[name] or by[name]["skipped"]
    assert by["gauss_newton_jacfwd"]["max_rel_diff_jtj_vs_kernel"] < 1e-3
    assert by["gauss_newton_jacfwd"]["max_rel_diff_jtr_vs_kernel"] < 1e-3
    assert by["calibrate_kernel"]["converged_fraction"] > 0.5
    assert "diffrax_over_kernel_rk4" in by["summary"]
