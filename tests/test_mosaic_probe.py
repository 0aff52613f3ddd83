"""The Mosaic GPU probe (`benchmarks.mosaic_gpu_probe`): what docs/gpu_backends.md reports
as lowering for CUDA from a CPU host still lowers, and what it reports as failing still
fails with the documented error."""

import pytest

pytest.importorskip(
    "jax.experimental.pallas.mosaic_gpu",
    reason="this JAX has no Pallas Mosaic GPU backend (jax.experimental.pallas.mosaic_gpu)")

from benchmarks import mosaic_gpu_probe as probe  # noqa: E402

LANE, WG = "mosaic_gpu:lane", "mosaic_gpu:warpgroup"

# (variant, backend, refs) that lower: every Lane row that does, and the Warpgroup rows the
# decision rests on.
LOWERS = [
    ("rk4_fori", LANE, "blocked"), ("rk4_fori", LANE, "gmem"),
    ("rk4_fori_f64", LANE, "gmem"),
    ("while_any_lane", WG, "gmem"),
    ("while_any_lane_loaded", LANE, "blocked"), ("while_any_lane_loaded", LANE, "gmem"),
    ("cond_any_lane", LANE, "blocked"), ("cond_any_lane", LANE, "gmem"),
    ("gather_select", LANE, "blocked"), ("gather_select", LANE, "gmem"),
    ("scalar_weights", LANE, "gmem"),
    ("scalar_weights_padded", LANE, "blocked"), ("scalar_weights_padded", LANE, "gmem"),
    ("save_slots", LANE, "gmem"),
    ("walk_port", LANE, "blocked"), ("walk_port", LANE, "gmem"), ("walk_port", WG, "gmem"),
    ("walk_port_f64", LANE, "gmem"), ("walk_port_f64", WG, "gmem"),
]

# Every Mosaic GPU row that fails, with the documented error.
TMA_F64 = "unsupported TMA dtype f64"
LAYOUT = "The loop body output has unexpected layout"
IOTA = "Failed to infer the output layout of the iota"
GATHER = "int_indexer_shape non-empty"
STOP_GRADIENT = "Unimplemented primitive in Pallas Mosaic GPU lowering: stop_gradient"
SMEM = "exceeds available shared memory"
FAILS = {
    ("rk4_fori_f64", LANE, "blocked"): TMA_F64, ("rk4_fori_f64", WG, "blocked"): TMA_F64,
    ("walk_port_f64", LANE, "blocked"): TMA_F64, ("walk_port_f64", WG, "blocked"): TMA_F64,
    ("while_any_lane", LANE, "blocked"): LAYOUT, ("while_any_lane", LANE, "gmem"): LAYOUT,
    ("gather_ref", LANE, "blocked"): IOTA, ("gather_ref", LANE, "gmem"): IOTA,
    ("walk", LANE, "blocked"): IOTA, ("walk", LANE, "gmem"): IOTA,
    **{(v, WG, refs): GATHER for v in ("gather_ref", "walk") for refs in probe.REFS},
    **{("gather_ref_lane_input", b, refs): GATHER for b in (LANE, WG) for refs in probe.REFS},
    **{("stop_gradient", b, refs): STOP_GRADIENT for b in (LANE, WG) for refs in probe.REFS},
    ("scalar_weights", LANE, "blocked"):
        "Only copies transferring a number of bytes divisible by the warpgroup size",
    ("scalar_weights", WG, "blocked"):
        "Async copies require the number of bits copied along the last dimension to be "
        "divisible by 128",
    ("save_slots", LANE, "blocked"): SMEM, ("save_slots", WG, "blocked"): SMEM,
}

# The project's kernel, code unchanged, compiler parameters swapped to Mosaic GPU.
KERNEL_FAILS = {("rk4", LANE): IOTA, ("tsit5", LANE): IOTA, ("rk4", WG): GATHER,
                ("tsit5", WG): STOP_GRADIENT}


@pytest.mark.parametrize("variant,backend,refs", LOWERS)
def test_lowers_for_h100(variant, backend, refs):
    row = probe.probe_variant(variant, backend, refs)
    assert row["lowered"], row["error"]
    assert row["arch"] == "9.0"


@pytest.mark.parametrize("key", list(FAILS), ids=["-".join(k) for k in FAILS])
def test_fails_as_documented(key):
    row = probe.probe_variant(*key)
    assert not row["lowered"]
    assert FAILS[key] in row["error"]


@pytest.mark.parametrize("method,backend", list(KERNEL_FAILS))
def test_project_kernel_fails_as_documented(method, backend):
    row = probe.probe_project_kernel(method, backend)
    assert not row["lowered"]
    assert KERNEL_FAILS[method, backend] in row["error"]


@pytest.mark.parametrize("variant", ["gather_ref", "walk", "stop_gradient", "rk4_fori_f64",
                                     "save_slots", "scalar_weights"])
def test_triton_lowers_what_mosaic_does_not(variant):
    pytest.importorskip("jax.experimental.pallas.triton",
                        reason="this JAX has no Pallas Triton backend")
    assert probe.probe_variant(variant, "triton", "blocked")["lowered"]


def test_ported_walk_matches_under_mosaic_interpreter():
    row = probe.interpret_check()
    assert row["ran"], row["error"]
    assert row["max_abs_diff"] == 0.0
