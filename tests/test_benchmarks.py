"""The GPU benchmark script runs end to end at a tiny size on CPU (interpret mode), so it is
ready when a GPU is: every variant reports, peers that are absent are skipped with a
reason, float32 results agree with the float64 reference."""

import json

from benchmarks import gpu_ensemble


def test_gpu_ensemble_benchmark_runs_small_on_cpu(capsys):
    # no extra block sizes, and no whole calibration (tests/test_kernel.py calibrates
    # through the kernel): the benchmark's variants and its accuracy checks, small
    gpu_ensemble.main(["--n", "16", "--gn-n", "16", "--ref-n", "4", "--blocks",
                       "--skip", "calibrate"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {x["variant"]: x for x in lines}
    for name in ("diffrax", "kernel_rk4", "kernel_tsit5", "kernel_rk4_glucose_only"):
        assert by[name]["run_s"] > 0 and by[name]["max_rel_diff_vs_f64_cpu"] < 1e-3, name
    for name in ("cuda_rk4", "torchdiffeq_rk4", "torchdiffeq_dopri5"):
        assert "run_s" in by[name] or by[name]["skipped"]
    assert by["gauss_newton_jacfwd"]["max_rel_diff_jtj_vs_kernel"] < 1e-3
    assert by["gauss_newton_jacfwd"]["max_rel_diff_jtr_vs_kernel"] < 1e-3
    assert "calibrate_kernel" not in by
    assert "diffrax_over_kernel_rk4" in by["summary"]
    assert "failed" not in json.dumps(lines)


def test_hand_written_cuda_reference_solves_the_same_problem(tmp_path):
    """The benchmark's CUDA kernel (the hardware reference), compiled as C with one loop
    over patients in place of the thread grid, gives the float64 glucose of the diffrax
    backend: it solves the same equations, doses and save times."""
    import ctypes
    import shutil
    import subprocess

    import numpy as np
    import pytest

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    prelude = ("#define __global__\n#define __restrict__\n"
               "struct dim { int x; };\nstatic struct dim blockIdx, threadIdx, blockDim;\n")
    driver = """
void run_all(const float* theta, const float* carbs, const float* insulin, const int* slots,
             float* out, int n, int m, float dt_save, int substeps) {
  blockDim.x = 1; threadIdx.x = 0;
  for (int i = 0; i < n; ++i) {
    blockIdx.x = i;
    bergman_rk4(theta, carbs, insulin, slots, out, n, m, dt_save, substeps);
  }
}
"""
    (tmp_path / "k.c").write_text(prelude + gpu_ensemble.CUDA_SRC.replace('extern "C"', "")
                                  + driver)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp_path / "k.so"),
                    str(tmp_path / "k.c")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "k.so"))
    n = 8
    _, theta, _, ts, carbs, insulin = gpu_ensemble.cohort(n)
    ref = gpu_ensemble.reference(n, n)

    def c_array(x, dtype=np.float32):
        return np.ascontiguousarray(np.asarray(x, dtype))

    th, cb, ins = c_array(np.asarray(theta).T), c_array(carbs.T), c_array(insulin.T)
    slots = c_array([int(t / gpu_ensemble.DT_SAVE) for t in gpu_ensemble.MEAL_T], np.int32)
    m = int(ts.shape[0])
    out = np.zeros((m, n), np.float32)

    def ptr(a):
        return a.ctypes.data_as(ctypes.c_void_p)

    lib.run_all(ptr(th), ptr(cb), ptr(ins), ptr(slots), ptr(out), ctypes.c_int(n),
                ctypes.c_int(m), ctypes.c_float(gpu_ensemble.DT_SAVE),
                ctypes.c_int(int(gpu_ensemble.DT_SAVE / gpu_ensemble.RK4_DT)))
    assert gpu_ensemble.rel_diff(out.T, ref) < 1e-5


def test_kernel_ir_figures(capsys):
    """Outside the kernel, the event preparation moves fewer bytes than the kernel's own
    output (XLA cost analysis); the solve kernel stores only the states, status and steps."""
    from benchmarks import kernel_ir

    kernel_ir.main(["--n", "4096"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {x["variant"]: x for x in lines}
    outside = by["outside_the_kernel"]
    assert outside["prepare_shared_ts_gb"] < outside["output_gb"]
    assert by["solve_rk4"]["stores"] == 5 + 2  # BergmanMinimal's 5 states, status, steps
    assert by["gauss_newton_tsit5"]["loads"] < 100
    # rolled Runge–Kutta stages trace the vector field and its sensitivities once: the
    # Tsit5 Gauss–Newton kernel has under half the float operations of the unrolled one
    assert by["gauss_newton_tsit5_rolled"]["float_ops"] < 0.5 * by["gauss_newton_tsit5"][
        "float_ops"]
    assert by["gauss_newton_tsit5_rolled"]["loads"] == by["gauss_newton_tsit5"]["loads"]


def test_structural_benchmark_scores_against_the_noise_free_truth(tmp_path):
    """benchmarks.hybrid_value_structural's scoring: the truth table is the virtual cohort's
    noise-free prediction at every observation; the constant forecast is each test
    patient's mean observation up to the cut, scored after it (checked here by hand); a
    run's forecast RMSE reads predictions.csv after the cut; the t-interval over seeds."""
    import csv

    import numpy as np

    from benchmarks import hybrid_value_structural as hv
    from hybrid_twin.config import load_config, solver_options
    from hybrid_twin.data.load import load_cohort
    from hybrid_twin.models import get_model

    case = hv.CASES["pk_enterohepatic"]
    over = ["data.virtual.n=8", "split.seed=3"]
    cfg_h, cohort_h, vc_h = hv.case_cohort(case.config, over)
    truth = hv.truth_table(cohort_h, vc_h)
    cfg = load_config(case.config, over)
    cohort, vc, _ = load_cohort(cfg.data, get_model(cfg.model.name),
                                options=solver_options(cfg),
                                truth=get_model(cfg.data.virtual.model))
    assert len(truth) == cohort.obs_mask.sum() == vc.true_predictions.size
    t = np.asarray(cohort.obs_times)
    assert truth["v3", round(float(t[3, 5]), 6), "concentration"] == vc.true_predictions[3, 5]
    part = cohort.split({"train": 0.5, "val": 0.25, "test": 0.25}, seed=3)["test"]
    rows = [cohort.ids.index(i) for i in part.ids]
    y, tt = np.asarray(cohort.obs_values)[rows], t[rows]
    level = np.array([y[k, tt[k] <= 24.0].mean() for k in range(len(rows))])
    late = tt > 24.0
    err = (level[:, None] - vc.true_predictions[rows])[late]
    got = hv.constant_scores(cfg_h, cohort_h, truth, "concentration", 24.0, "test")
    assert got["n"] == late.sum()
    np.testing.assert_allclose(got["rmse_truth"], np.sqrt(np.mean(err ** 2)), rtol=1e-6)
    # a run's predictions: the truth itself scores 0 against the truth
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "TIME", "OBS", "DV", "PRED", "SPLIT"])
        for k, r in enumerate(rows):
            for j in np.flatnonzero(late[k]):
                w.writerow([cohort.ids[r], repr(float(tt[k, j])), "concentration",
                            repr(float(y[k, j])), repr(float(vc.true_predictions[r, j])),
                            "test"])
    s = hv.forecast_scores(run, truth, "concentration", 24.0, "test")
    assert s["rmse_truth"] == 0.0 and s["n"] == late.sum()
    np.testing.assert_allclose(s["rmse_data"], np.sqrt(np.mean(
        (y[late] - vc.true_predictions[rows][late]) ** 2)), rtol=1e-6)
    ci = hv.interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and abs(ci["ci95"] - 4.302653 * 1.0 / np.sqrt(3)) < 1e-5


def test_structural_benchmark_neural_odes():
    """The benchmark's neural ODEs build from its overrides: on the T1D cases an
    observed-state one (the CGM state and two latent states driven by the network, the
    dose absorption moved by the mechanism, everything else held); on PK the depot
    absorbs as in the mechanism and the network drives the central amount."""
    from benchmarks import hybrid_value_structural as hv
    from hybrid_twin.config import load_config
    from hybrid_twin.models import get_model
    from training.run import build_model

    expect = {"t1d_hovorka_dawn": (("C", "z1", "z2"), ("D1", "D2", "S1", "S2")),
              "t1d_bergman": (("G", "z1", "z2"), ("Q_gut", "S_sc")),
              "pk_enterohepatic": (("central",), ("depot",))}
    for name, (driven, inputs) in expect.items():
        case = hv.CASES[name]
        cfg = load_config(case.config, hv.node_learned(case, 16))
        node = build_model(cfg, get_model(cfg.model.name))
        assert not node.use_mechanism and node.input_states == inputs, name
        (corr,) = node.corrections
        assert corr.states == driven and corr.net.mlp.width_size == 16, name
        assert {"sin_day", "cos_day", *driven, *inputs} <= set(corr.features), name
    # T1D: after a meal and a bolus, the absorption states move as in the mechanism, the
    # held ones not at all, the driven ones by the network (given non-zero output weights)
    import equinox as eqx
    import numpy as np

    case = hv.CASES["t1d_hovorka_dawn"]
    cfg = load_config(case.config, hv.node_learned(case, 16))
    mech = get_model(cfg.model.name)
    node = build_model(cfg, mech)
    last = node.corrections[0].net.mlp.layers[-1]
    node = eqx.tree_at(lambda m: m.corrections[0].net.mlp.layers[-1].bias, node,
                       last.bias + 0.1)
    p = mech.param_dict(mech.typical_params())
    y = [float(v) for v in node.initial_state(p)]
    for s, v in (("D1", 20.0), ("D2", 5.0), ("S1", 2000.0), ("S2", 500.0)):
        y[node.index("state", s)] = v
    y = tuple(np.asarray(v) for v in y)
    u = {n: 0.0 for n in node.input_names}
    dy = np.array([float(v) for v in node.vector_field(0.0, y, p, u)])
    ref = np.array([float(v) for v in mech.vector_field(0.0, y[:mech.n_states], p, u)])
    for k, s in enumerate(node.state_names):
        if s in ("D1", "D2", "S1", "S2"):
            assert dy[k] == ref[k] != 0.0, s
        elif s in ("C", "z1", "z2"):
            assert dy[k] != 0.0, s
        else:
            assert dy[k] == 0.0, s
