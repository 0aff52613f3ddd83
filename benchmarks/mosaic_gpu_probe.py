"""Which features of the one-patient-per-lane kernel lower through Pallas Mosaic GPU.

The kernel backend (`hybrid_twin.solve.kernel`) is lowered through Pallas' Triton backend,
which JAX 0.11 deprecates. This probe writes small kernels in the same style (one patient
per lane, a block of B = 128 patients per program, states and parameters as `(B,)`
vectors, the `BergmanMinimal` vector field evaluated component by component) and lowers
each for CUDA from this host (`lower_for_cuda`: no GPU needed) through

- `mosaic_gpu:lane` and `mosaic_gpu:warpgroup`: Mosaic GPU with
  `plgpu.CompilerParams(lowering_semantics=...)` (Lane is the default in JAX 0.10,
  Warpgroup from JAX 0.11);
- `triton`: the same kernel bodies with the Triton compiler parameters;

each with the kernel's refs given two ways (`refs`):

- `blocked`: `pl.pallas_call` with a `(rows, B)` `BlockSpec` per operand, as the kernel
  backend does today (Mosaic GPU stages such blocks in shared memory by TMA);
- `gmem`: the refs stay in global memory and each program reads and writes its lanes
  `ref[i, pl.ds(start, B)]` (`Window`; Mosaic GPU: `plgpu.kernel`, the entry point its
  docs recommend; Triton: `pl.pallas_call` over whole arrays).

Lowering stops at the backend's IR (Mosaic GPU MLIR or Triton IR, embedded in a custom
call); compiling that IR for the GPU happens in XLA on a GPU and is not exercised here.

Variants, each one feature the kernel needs:

- `rk4_fori`, `rk4_fori_f64`: fixed-step RK4 in a `fori_loop` (float32, float64);
- `while_any_lane`: a `while_loop` that runs while any lane is active (the condition
  reduces over lanes), each lane stepping to its own end time, the time carry started
  from `jnp.zeros_like` (as the integrator does);
- `while_any_lane_loaded`: the same with the time carry started from loaded data;
- `cond_any_lane`: `lax.cond` on "any lane has a pending dose", returning `(B,)` vectors;
- `gather_ref`: the integrator's per-lane gather `ref[iq, lane]`, `iq` a `(B,)` integer
  vector, `lane = jnp.arange(B)`;
- `gather_ref_lane_input`: the same gather with `lane` read from an input;
- `gather_select`: the same values by static row loads and a per-lane select;
- `stop_gradient`: `lax.stop_gradient` on a step size (the step-size controller's);
- `scalar_weights`, `scalar_weights_padded`: a learned correction whose weights, a `(W,)`
  operand shared by all lanes, are read one scalar at a time (`kernel._ScalarView`), with
  W = 7 and W = 32 (every other variant also takes a W = 32 weight operand);
- `save_slots`: the state written after each of 289 RK4 steps at a dynamic row of an
  (M S, B) output block, as the kernel writes its save slots (a day every 5 min);
- `walk`: the integrator's skeleton, written as the integrator writes it: a while loop
  over any active lane whose body reads each lane's next event time (`ref[iq, lane]`),
  applies due doses under `lax.cond` and takes an RK4 step;
- `walk_port`, `walk_port_f64`: `walk` with the gather as a select and the carries
  started from loaded data.

The project's own kernel (`run_kernel`, `kernel_*`: RK4, Tsit5, RK4 in float64) is lowered
through Triton, and, its code unchanged and only its compiler parameters swapped, through
Mosaic GPU. Last, `walk_port` runs on CPU under Mosaic GPU's interpreter and is compared
with `walk` under Pallas' generic interpreter (`interpret_check`).

One JSON line per (variant, backend, refs): {"variant", "backend", "refs", "lowered",
"error"}, the error being the first line of the lowering error; a Mosaic GPU row that
lowered also gives "arch", the compute capability its module targets.

    python -m benchmarks.mosaic_gpu_probe --out benchmarks/results/mosaic_gpu_probe-cpu.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.common import emit
from hybrid_twin.models import BergmanMinimal
from hybrid_twin.solve.kernel import lower_for_cuda

MODEL = BergmanMinimal()
LANES = 128  # patients per program: one warpgroup (128 threads) on Mosaic GPU
PROGRAMS = 2
N_PATIENTS = LANES * PROGRAMS
N_EVENTS = 4  # rows of the per-lane event table
DT = 1.0  # min
N_STEPS = 8
N_SLOTS = 289  # save slots: a day of glucose every 5 min
N_WEIGHTS = 7  # an odd count, as a small network's flattened weights often are
BACKENDS = ("mosaic_gpu:lane", "mosaic_gpu:warpgroup", "triton")
REFS = ("blocked", "gmem")


def compiler_params(backend: str) -> Any:
    """Pallas compiler parameters that select `backend` for the CUDA lowering."""
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=1)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    semantics = {"lane": plgpu.LoweringSemantics.Lane,
                 "warpgroup": plgpu.LoweringSemantics.Warpgroup}[backend.split(":")[1]]
    return plgpu.CompilerParams(lowering_semantics=semantics)


class Refs(NamedTuple):
    """One program's view of the inputs (patients on the last axis, B lanes) and of the
    output ((S, B), or (M S, B) with M save slots)."""

    theta: Any  # (P, B)
    t_end: Any  # (1, B)
    q_t: Any  # (Q, B) event times
    q_amt: Any  # (Q, B) event amounts (into the gut)
    iq: Any  # (1, B) int32: first event
    lane: Any  # (1, B) int32: lane index in the block
    w: Any  # (W,) network weights, shared by all lanes
    out: Any


def field(t: jax.Array, y: list, p: dict) -> list:
    """`BergmanMinimal.vector_field` on lane vectors, no inputs."""
    return list(MODEL.vector_field(t, tuple(y), p, {"carb_rate": jnp.zeros_like(y[0])}))


def rk4(t: jax.Array, y: list, h: Any, p: dict) -> list:
    """One classical Runge–Kutta step of every lane."""
    k1 = field(t, y, p)
    k2 = field(t + h / 2, [a + h / 2 * k for a, k in zip(y, k1)], p)
    k3 = field(t + h / 2, [a + h / 2 * k for a, k in zip(y, k2)], p)
    k4 = field(t + h, [a + h * k for a, k in zip(y, k3)], p)
    return [a + h / 6 * (b + 2 * c + 2 * d + e) for a, b, c, d, e in zip(y, k1, k2, k3, k4)]


def params(r: Refs) -> dict:
    """Parameter name -> (B,) row of the parameter block."""
    return {name: r.theta[i] for i, name in enumerate(MODEL.param_names)}


def store(r: Refs, y: list) -> None:
    """Write the state list `y` into the output rows."""
    for i, v in enumerate(y):
        r.out[i] = v


def gather(ref, iq: jax.Array, lane: jax.Array | None = None) -> jax.Array:
    """ref[iq[l], l] for every lane l, as the integrator reads it."""
    lane = jnp.arange(LANES, dtype=jnp.int32) if lane is None else lane
    return ref[iq, lane]


def select(ref, iq: jax.Array) -> jax.Array:
    """ref[iq[l], l] for every lane l, by loading each row and selecting per lane."""
    out = ref[0]
    for j in range(1, ref.shape[0]):
        out = jnp.where(iq == j, ref[j], out)
    return out


def k_rk4_fori(r: Refs) -> None:
    p = params(r)
    y0 = list(MODEL.initial_state(p))
    t0 = jnp.zeros_like(y0[0])

    def body(i, y):
        return rk4(t0 + i.astype(t0.dtype) * DT, list(y), DT, p)

    store(r, jax.lax.fori_loop(np.int32(0), np.int32(N_STEPS), body, y0))


def _k_while(loaded_start: bool) -> Callable[[Refs], None]:
    def kernel(r: Refs) -> None:
        p = params(r)
        t_end = r.t_end[0]
        t_start = t_end * 0.0 if loaded_start else jnp.zeros_like(t_end)

        def cond(c):
            return jnp.max((c[0] < t_end).astype(jnp.int32)) > 0

        def body(c):
            t, y = c[0], list(c[1:])
            run = t < t_end
            h = jnp.minimum(DT, t_end - t)
            new = rk4(t, y, h, p)
            return (jnp.where(run, t + h, t), *[jnp.where(run, a, b) for a, b in zip(new, y)])

        out = jax.lax.while_loop(cond, body, (t_start, *MODEL.initial_state(p)))
        store(r, list(out[1:]))

    return kernel


def k_cond_any_lane(r: Refs) -> None:
    p = params(r)
    y = list(MODEL.initial_state(p))
    amount = r.q_amt[0]
    pending = amount > 0

    def dose():
        return tuple(v + jnp.where(pending, amount, 0.0) if i == 3 else v
                     for i, v in enumerate(y))

    y = jax.lax.cond(jnp.max(pending.astype(jnp.int32)) > 0, dose, lambda: tuple(y))
    store(r, rk4(jnp.zeros_like(y[0]), list(y), DT, p))


def _k_gather(read: Callable) -> Callable[[Refs], None]:
    def kernel(r: Refs) -> None:
        value = read(r, r.q_t, r.iq[0]) + read(r, r.q_amt, r.iq[0])
        store(r, [value] * MODEL.n_states)

    return kernel


def _k_walk(read: Callable, loaded_start: bool) -> Callable[[Refs], None]:
    """Lanes step to their own end time, stopping at their own doses (event rows iq = 0,
    1, ...; a dose adds its amount to the gut), as `_integrator.integrate` walks."""

    def kernel(r: Refs) -> None:
        p = params(r)
        t_end = r.t_end[0]
        t_start = t_end * 0.0 if loaded_start else jnp.zeros_like(t_end)

        def cond(c):
            return jnp.max((c[0] < t_end).astype(jnp.int32)) > 0

        def body(c):
            t, iq, y = c[0], c[1], list(c[2:])
            iq_c = jnp.minimum(iq, N_EVENTS - 1)
            t_q = jnp.where(iq < N_EVENTS, read(r, r.q_t, iq_c), jnp.inf)
            pending = (iq < N_EVENTS) & (t_q <= t)
            amount = jnp.where(pending, read(r, r.q_amt, iq_c), 0.0)

            def dose():
                return tuple(v + amount if i == 3 else v for i, v in enumerate(y))

            y = list(jax.lax.cond(jnp.max(pending.astype(jnp.int32)) > 0, dose,
                                  lambda: tuple(y)))
            iq = jnp.where(pending, iq + 1, iq)
            run = t < t_end
            h = jnp.minimum(jnp.minimum(DT, t_end - t), jnp.where(t_q > t, t_q - t, DT))
            new = rk4(t, y, h, p)
            return (jnp.where(run, t + h, t), iq,
                    *[jnp.where(run, a, b) for a, b in zip(new, y)])

        init = (t_start, r.iq[0], *MODEL.initial_state(p))
        store(r, list(jax.lax.while_loop(cond, body, init)[2:]))

    return kernel


def k_stop_gradient(r: Refs) -> None:
    p = params(r)
    y = list(MODEL.initial_state(p))
    h = jax.lax.stop_gradient(jnp.minimum(DT, r.t_end[0]))
    store(r, rk4(jnp.zeros_like(y[0]), y, h, p))


def k_scalar_weights(r: Refs) -> None:
    """A learned correction on glucose from one tanh neuron whose weights are read one
    scalar at a time (as `kernel._ScalarView` reads a network's weights)."""
    p = params(r)
    y = list(MODEL.initial_state(p))
    w = [r.w[i] for i in range(r.w.shape[0])]
    dy = field(jnp.zeros_like(y[0]), y, p)
    dy[0] = dy[0] + w[2] * jnp.tanh(w[0] * y[0] + w[1]) + w[3]
    store(r, [a + DT * b for a, b in zip(y, dy)])


def k_save_slots(r: Refs) -> None:
    """RK4 steps with the state written after each, at save slot s (rows s S + i), as the
    kernel writes its (M, S, B) output block."""
    p = params(r)
    y0 = list(MODEL.initial_state(p))
    t0 = jnp.zeros_like(y0[0])
    s_dim = MODEL.n_states

    def body(s, y):
        y = rk4(t0 + s.astype(t0.dtype) * DT, list(y), DT, p)
        for i, v in enumerate(y):
            r.out[s * s_dim + i] = v
        return y

    jax.lax.fori_loop(np.int32(0), np.int32(N_SLOTS), body, y0)


def _iota_gather(r: Refs, ref, iq):
    return gather(ref, iq)


def _input_lane_gather(r: Refs, ref, iq):
    return gather(ref, iq, r.lane[0])


def _select(r: Refs, ref, iq):
    return select(ref, iq)


class Variant(NamedTuple):
    """A probe kernel with its float dtype, weight count and output rows."""

    kernel: Callable[[Refs], None]
    dtype: Any = jnp.float32
    n_weights: int = 32  # 128 bytes in float32
    out_rows: int = MODEL.n_states


VARIANTS: dict[str, Variant] = {
    "rk4_fori": Variant(k_rk4_fori),
    "rk4_fori_f64": Variant(k_rk4_fori, jnp.float64),
    "while_any_lane": Variant(_k_while(loaded_start=False)),
    "while_any_lane_loaded": Variant(_k_while(loaded_start=True)),
    "cond_any_lane": Variant(k_cond_any_lane),
    "gather_ref": Variant(_k_gather(_iota_gather)),
    "gather_ref_lane_input": Variant(_k_gather(_input_lane_gather)),
    "gather_select": Variant(_k_gather(_select)),
    "stop_gradient": Variant(k_stop_gradient),
    "scalar_weights": Variant(k_scalar_weights, n_weights=N_WEIGHTS),
    "scalar_weights_padded": Variant(k_scalar_weights),
    "save_slots": Variant(k_save_slots, out_rows=N_SLOTS * MODEL.n_states),
    "walk": Variant(_k_walk(_iota_gather, loaded_start=False)),
    "walk_port": Variant(_k_walk(_select, loaded_start=True)),
    "walk_port_f64": Variant(_k_walk(_select, loaded_start=True), jnp.float64),
}


def inputs(dtype: Any, n_weights: int) -> list[np.ndarray]:
    """The operands of `Refs` but the output, N patients on the last axis."""
    theta = np.repeat(np.asarray(MODEL.typical_params())[:, None], N_PATIENTS, 1)
    t_end = np.full((1, N_PATIENTS), DT * N_STEPS)
    q_t = np.repeat(np.arange(N_EVENTS, dtype=float)[:, None] * 2.0, N_PATIENTS, 1)
    q_amt = np.full((N_EVENTS, N_PATIENTS), 50.0)
    lane = np.tile(np.arange(LANES, dtype=np.int32), PROGRAMS)[None]
    w = np.linspace(0.1, 0.7, n_weights)
    return [theta.astype(dtype), t_end.astype(dtype), q_t.astype(dtype),
            q_amt.astype(dtype), np.zeros((1, N_PATIENTS), np.int32), lane, w.astype(dtype)]


class Window:
    """A program's lanes `start:start + B` of a 2-d ref in global memory, indexed as a
    block is: `w[i]` (row i) and `w[iq, lane]` (a per-lane gather)."""

    def __init__(self, ref, start: jax.Array):
        self.ref, self.start = ref, start
        self.shape = (ref.shape[0], LANES)

    def _index(self, idx):
        if isinstance(idx, tuple):
            return idx[0], self.start + idx[1]
        return idx, pl.ds(self.start, LANES)

    def __getitem__(self, idx):
        return self.ref[self._index(idx)]

    def __setitem__(self, idx, value) -> None:
        self.ref[self._index(idx)] = value


def windows(start: jax.Array, refs: tuple) -> Refs:
    """The program's `Window`s of the 2-d refs (1-d refs are shared by all lanes)."""
    return Refs(*[Window(x, start) if len(x.shape) == 2 else x for x in refs])


def probe_call(kernel: Callable[[Refs], None], backend: str, refs: str, dtype: Any,
               out_rows: int = MODEL.n_states) -> Callable:
    """`kernel` over programs of LANES patients, for `backend`, with `refs` operands and
    an (out_rows, N) output."""
    out_type = jax.ShapeDtypeStruct((out_rows, N_PATIENTS), dtype)
    params_ = compiler_params(backend)

    if refs == "blocked":
        def spec(shape: tuple[int, ...]) -> pl.BlockSpec:
            if len(shape) == 1:
                return pl.BlockSpec(shape, lambda i: (0,))
            return pl.BlockSpec((shape[0], LANES), lambda i: (0, i))

        def fn(*args):
            return pl.pallas_call(
                lambda *rs: kernel(Refs(*rs)), grid=(PROGRAMS,),
                in_specs=[spec(a.shape) for a in args],
                out_specs=spec(out_type.shape),
                out_shape=out_type, compiler_params=params_)(*args)

        return fn

    if backend == "triton":
        def fn(*args):
            return pl.pallas_call(
                lambda *rs: kernel(windows(pl.program_id(0) * LANES, rs)), grid=(PROGRAMS,),
                out_shape=out_type, compiler_params=params_)(*args)

        return fn
    return mosaic_kernel(kernel, out_type, compiler_params=params_)


def mosaic_kernel(kernel: Callable[[Refs], None], out_type: jax.ShapeDtypeStruct,
                  **kwargs: Any) -> Callable:
    """`kernel` as a `plgpu.kernel` over programs of LANES patients, refs in GMEM."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        lambda *rs: kernel(windows(jax.lax.axis_index("programs") * LANES, rs)),
        out_type=out_type, grid=(PROGRAMS,), grid_names=("programs",), **kwargs)


def first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def mosaic_archs() -> Iterator[list[str]]:
    """Collects the GPU architecture ("9.0") each Mosaic GPU module is lowered for."""
    from jax._src.pallas.mosaic_gpu import lowering

    archs: list[str] = []
    original = lowering.lower_pipelined_jaxpr_to_module

    def capture(*args, **kwargs):
        res = original(*args, **kwargs)
        attrs = res.module.operation.attributes
        archs.append(f"{attrs['mosaic_gpu.arch_major'].value}."
                     f"{attrs['mosaic_gpu.arch_minor'].value}")
        return res

    with mock.patch.object(lowering, "lower_pipelined_jaxpr_to_module", capture):
        yield archs


def try_lower(fn: Callable, *args) -> dict:
    """{"lowered": True, "error": None}, or False and the lowering error's first line;
    for Mosaic GPU modules also "arch", the architecture they were lowered for."""
    try:
        with warnings.catch_warnings(), mosaic_archs() as archs:
            warnings.simplefilter("ignore", DeprecationWarning)
            lower_for_cuda(fn, *args)
        res: dict[str, Any] = {"lowered": True, "error": None}
        if archs:
            res["arch"] = ",".join(sorted(set(archs)))
        return res
    except Exception as e:  # noqa: BLE001 - the error is the result
        return {"lowered": False, "error": first_line(e)}


def _x64(dtype: Any) -> contextlib.AbstractContextManager:
    """float64 enabled for float64 variants (and left on where it already is)."""
    return jax.enable_x64(dtype == jnp.float64 or jax.config.jax_enable_x64)


def probe_variant(variant: str, backend: str, refs: str) -> dict:
    """Lower one variant for one backend and ref placement."""
    v = VARIANTS[variant]
    with _x64(v.dtype):
        res = try_lower(probe_call(v.kernel, backend, refs, v.dtype, v.out_rows),
                        *inputs(v.dtype, v.n_weights))
    return {"variant": variant, "backend": backend, "refs": refs, **res}


def probe_project_kernel(method: str, backend: str = "triton",
                         dtype: Any = jnp.float32) -> dict:
    """Lower the project's kernel (`run_kernel`) for a small glucose cohort with one meal,
    one block of LANES patients. For a Mosaic GPU backend the kernel's code is unchanged
    and only its compiler parameters are swapped (`kernel.plgpu.CompilerParams`)."""
    from hybrid_twin import RK4, Schedule, Tsit5
    from hybrid_twin.solve import kernel as kernel_module
    from hybrid_twin.solve._core import Batch, prepare

    n = LANES
    with _x64(dtype):
        theta = jnp.broadcast_to(jnp.asarray(MODEL.typical_params(), dtype),
                                 (n, MODEL.n_params))
        sched = Schedule.stack([Schedule.build(MODEL, [(2.0, 50.0, "meal")], dtype=dtype)]
                               * n)
        ts = jnp.broadcast_to(jnp.asarray([0.0, 5.0, 10.0], dtype), (n, 3))
        mask = jnp.ones((n, 3), bool)
        method_ = RK4(0.5) if method == "rk4" else Tsit5()

        def solve(th, sched, ts, mask):
            prep = prepare(MODEL, Batch(th, sched, ts, mask, dtype(0.0), False))
            return kernel_module.run_kernel(MODEL, th, prep, method=method_,
                                            interpret=False, block=n)["states"]

        if backend == "triton":
            res = try_lower(solve, theta, sched, ts, mask)
        elif not hasattr(kernel_module, "plgpu"):
            res = {"lowered": False, "error": "kernel.py no longer names its Pallas backend "
                   "module `plgpu`: update probe_project_kernel"}
        else:
            shim = SimpleNamespace(CompilerParams=lambda **_: compiler_params(backend))
            with mock.patch.object(kernel_module, "plgpu", shim):
                res = try_lower(solve, theta, sched, ts, mask)
    suffix = "" if dtype == jnp.float32 else "_f64"
    return {"variant": f"kernel_{method}{suffix}", "backend": backend, "refs": "blocked",
            **res}


def interpret_check(port: str = "walk_port", reference: str = "walk") -> dict:
    """Run `port` on CPU through Mosaic GPU's interpreter (`plgpu.kernel`, GMEM refs) and
    `reference` through Pallas' generic interpreter (`blocked`, as the kernel backend runs
    on CPU), one patient without doses; "max_abs_diff" between the two outputs."""
    v, ref = VARIANTS[port], VARIANTS[reference]
    args = inputs(v.dtype, v.n_weights)
    args[3][:, 5] = 0.0
    out_type = jax.ShapeDtypeStruct((v.out_rows, N_PATIENTS), v.dtype)
    row = {"variant": port, "reference": reference, "backend": "mosaic_gpu:interpret",
           "refs": "gmem"}
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        with _x64(v.dtype):
            got = mosaic_kernel(v.kernel, out_type, interpret=InterpretGPUParams())(*args)

            def spec(shape):
                if len(shape) == 1:
                    return pl.BlockSpec(shape, lambda i: (0,))
                return pl.BlockSpec((shape[0], LANES), lambda i: (0, i))

            want = pl.pallas_call(lambda *rs: ref.kernel(Refs(*rs)), grid=(PROGRAMS,),
                                  in_specs=[spec(a.shape) for a in args],
                                  out_specs=spec(out_type.shape), out_shape=out_type,
                                  interpret=True)(*args)
        diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
        return {**row, "ran": True, "error": None, "max_abs_diff": diff}
    except Exception as e:  # noqa: BLE001 - the error is the result
        return {**row, "ran": False, "error": first_line(e)}


def probe_all() -> Iterator[dict]:
    """Every variant on every backend and ref placement, then the project's kernel."""
    for variant in VARIANTS:
        for backend in BACKENDS:
            for refs in REFS:
                yield probe_variant(variant, backend, refs)
    for backend in BACKENDS:
        for method in ("rk4", "tsit5"):
            yield probe_project_kernel(method, backend)
    yield probe_project_kernel("rk4", "triton", jnp.float64)
    yield interpret_check()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    for row in probe_all():
        emit({"benchmark": "mosaic_gpu_probe", **row, "jax": jax.__version__}, args.out)


if __name__ == "__main__":
    main()
