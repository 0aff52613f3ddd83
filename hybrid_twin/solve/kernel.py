"""The "kernel" backend: a whole cohort's solve in one Pallas kernel.

The model's own vector field (mechanistic part and learned terms) is traced into one
`pallas_call`. Patients lie along the last axis; each program takes a block of `B`
patients and runs the batch integrator (`_integrator.integrate`: the same stages, step
control and event walking as the ensemble backend) inside the kernel, with states,
parameters and sensitivities as `(B,)` vectors (one lane per patient) and the network
weights loaded once per program as scalars (`_ScalarView`; a learned term evaluates its
network neuron by neuron on such weights). All lanes write save slot s together
(coalesced stores).

Methods: `RK4(dt0)` and the adaptive pairs Tsit5 and Dopri5. Forward sensitivities serve
two ways: `normal_equations` accumulates each patient's weighted JᵀJ, Jᵀr and residual sum
of squares at its observations inside the kernel (the Jacobian is never stored), which
Levenberg–Marquardt calibration uses; and `solve` is a `jax.custom_jvp` in the
parameters, so `jax.jacfwd` and `jax.grad` of `simulate` work (forward-mode derivatives
with respect to network weights, schedules or times are refused). With
`differentiation="reverse"` (hybrid training) `jax.grad` is taken with respect to
everything: the forward solve runs in the kernel, the pullback is the ensemble backend's
reverse mode through the same integrator, recomputed on arrays (see `_reverse_solve`).

On CPU the kernel runs in Pallas interpret mode (how CI tests it); on GPU it is lowered
through Triton.
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # deprecated in JAX 0.11 (docs/gpu_backends.md); without it the kernel is CPU-only
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
    plgpu = None

from ..models.base import MechanisticModel
from ..schedule import Schedule
from ._core import RK4, Batch, Method, Prepared, Solution, StepSizeController, prepare
from ._integrator import Sources, integrate, solve_on_arrays, upper_triangle
from .backend import AxisDirections, Backend, FitData, NormalEquations


def interpret_default() -> bool:
    """Interpret mode unless the default JAX backend is a GPU."""
    return jax.default_backend() != "gpu"


class _ScalarView:
    """A network weight inside the kernel: its scalars, loaded from the flattened ref once,
    indexed like the array (w[j, f], b[j]); `.shape` as the array's."""

    def __init__(self, ref, shape):
        self.shape = tuple(shape)
        size = int(np.prod(shape)) if shape else 1
        self._values = [ref[i] for i in range(size)]

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        flat = int(np.ravel_multi_index(tuple(int(i) for i in idx), self.shape)) if self.shape else 0
        return self._values[flat]


def run_kernel(model: MechanisticModel, theta: jax.Array, prep: Prepared, *,
               method: Method, controller: StepSizeController = StepSizeController(),
               max_steps: int = 4096, directions: jax.Array | AxisDirections | None = None,
               data: FitData | None = None,
               want_states: bool = True, want_sens: bool = False,
               block: int | None = None, interpret: bool | None = None,
               num_warps: int | None = None, save_states: tuple[int, ...] | None = None,
               active: jax.Array | None = None, roll_stages: bool = False
               ) -> dict[str, Any]:
    """Run the fused solve.

    Args:
        model: the (hybrid) model; its array leaves are kernel inputs.
        theta: (N, P) natural-unit parameters.
        prep: `prepare(...)` of the same batch.
        method, controller, max_steps: the method, the step-size controller (adaptive
            methods) and the step limit per patient, in total.
        directions: (K, N, P) parameter tangents d theta / d direction, or
            `AxisDirections`; None: no sensitivities.
        data: `FitData` with (N, M) arrays; with `directions`, JᵀJ, Jᵀr and the cost are
            accumulated for r = (y - f) * weight, J = dr / d direction.
        want_states, want_sens: return the states (N, M, S) / sensitivities (N, M, K, S)
            at the save slots (rows of masked save slots are unspecified).
        active: (N,) bool or None (all): patients to integrate; the others are skipped
            (status `Status.SKIPPED`, outputs unspecified).
        save_states: indices of the states written (default all; e.g. (0,) for glucose
            only, which cuts the kernel's output traffic).
        block: patients per program (default `default_block(N)` on GPU, the whole batch
            rounded up to a power of two, at most 1024, in interpret mode).
        num_warps: warps per program on GPU (default one per 32 patients, at most 4).
        roll_stages: the Runge–Kutta stages as a loop in the kernel (less code for Triton
            to compile; see `Kernel.roll_stages`).

    Returns a dict with "status", "steps" (N,) and as requested "states", "sens", "H"
    (N, K, K), "g" (N, K), "cost" (N,).
    """
    interpret = interpret_default() if interpret is None else interpret
    dtype = theta.dtype
    n = theta.shape[0]
    s_dim = model.n_states
    m_dim = prep.ts.shape[1]
    axis_dirs = isinstance(directions, AxisDirections)
    k_dim = 0 if directions is None else (
        len(directions.index) if axis_dirs else directions.shape[0])
    if block is None:
        block = (default_block(n) if not interpret
                 else min(1024, max(8, 1 << (n - 1).bit_length())))
    num_warps = num_warps or max(1, min(4, block // 32))
    if block & (block - 1):
        raise ValueError(f"kernel block must be a power of two, got {block}")
    n_pad = -(-n // block) * block
    arrays, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)

    def lanes(x):
        x = jnp.asarray(x)
        if n_pad != n:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)], mode="edge")
        return x, pl.BlockSpec(x.shape[:-1] + (block,),
                               lambda i, nd=x.ndim: (0,) * (nd - 1) + (i,))

    def whole(x):
        x = jnp.asarray(x)
        return x, pl.BlockSpec(x.shape, lambda i, nd=x.ndim: (0,) * nd)

    def opt(x, how=lanes):
        return (None, None) if x is None else how(x)

    n_in = len(model.input_names) if prep.u_a is not None else 0
    named = {
        "theta": lanes(theta.T),
        "ts": whole(prep.ts_lanes) if prep.ts_lanes.ndim == 1 else lanes(prep.ts_lanes),
        "t0": lanes(prep.t0), "t_end": lanes(prep.t_end), "q_t": lanes(prep.q_t),
        "q_jump": lanes(prep.q_jump), "q_state": lanes(prep.q_state), "rate": opt(prep.rate),
        "anchor": opt(prep.anchor if n_in else None), "u_a": opt(prep.u_a if n_in else None),
        "u_slope": opt(prep.u_slope if n_in else None), "dtmax": opt(prep.dtmax),
        "directions": opt(None if directions is None else (
            directions.scale if axis_dirs else jnp.moveaxis(directions, 1, -1))),
        "active": opt(None if active is None else jnp.asarray(active, jnp.int32)[None]),
    }
    if data is not None:
        named.update(y_obs=lanes(jnp.where(data.weight > 0, data.y, 0.0).astype(dtype).T),
                     weight=lanes(data.weight.astype(dtype).T),
                     obs_kind=lanes(jnp.asarray(data.obs_index, jnp.int32).T))
    src_in = Sources(**{k: v[0] for k, v in named.items()})
    src_spec = Sources(**{k: v[1] for k, v in named.items()})
    w_in = [whole(jnp.reshape(jnp.asarray(leaf, dtype), (-1,))) for leaf in leaves]

    tri = upper_triangle(k_dim)
    saved = tuple(range(s_dim)) if save_states is None else tuple(save_states)
    shapes: dict[str, tuple] = {}
    if want_states:
        shapes["states"] = ((m_dim, len(saved)), dtype)
    if want_sens:
        shapes["sens"] = ((m_dim, k_dim * s_dim), dtype)
    if data is not None:
        shapes.update(H=((len(tri),), dtype), g=((max(k_dim, 1),), dtype), cost=((1,), dtype))
    shapes.update(status=((1,), jnp.int32), steps=((1,), jnp.int32))
    out_shape = {k: jax.ShapeDtypeStruct(s + (n_pad,), dt) for k, (s, dt) in shapes.items()}
    out_spec = {k: pl.BlockSpec(s + (block,), lambda i, nd=len(s): (0,) * nd + (i,))
                for k, (s, _) in shapes.items()}

    def kernel(src: Sources, w_refs, out):
        weights = [_ScalarView(r, leaf.shape) for r, leaf in zip(w_refs, leaves)]
        m = eqx.combine(jax.tree.unflatten(treedef, weights), static)

        def write(s, y, _):
            if want_states:
                for row, i in enumerate(saved):
                    out["states"][s, row] = y[i]
            if want_sens:
                for i in range(k_dim * s_dim):
                    out["sens"][s, i] = y[s_dim + i]

        walked = integrate(m, src, lanes=block, dtype=dtype, method=method,
                           controller=controller, max_steps=max_steps,
                           n_slots=m_dim, axis_index=directions.index if axis_dirs else None,
                           k_dim=k_dim, write=write, roll_stages=roll_stages)
        if data is not None:
            for a, v in enumerate(walked.normal.h):
                out["H"][a] = v
            for a, v in enumerate(walked.normal.g):
                out["g"][a] = v
            out["cost"][0] = walked.normal.cost
        out["status"][0] = walked.status
        out["steps"][0] = walked.steps

    compiler_params = None
    if not interpret and plgpu is None:
        raise RuntimeError("the kernel backend needs Pallas' Triton backend "
                           "(jax.experimental.pallas.triton), which this jax does not have: "
                           "use the ensemble backend, or jax < 0.12 (docs/gpu_backends.md)")
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    (results,) = pl.pallas_call(
        kernel,
        grid=(n_pad // block,),
        in_specs=[src_spec, [s for _, s in w_in]],
        out_specs=(out_spec,),
        out_shape=(out_shape,),
        interpret=interpret,
        compiler_params=compiler_params,
        name="hybrid_twin_ensemble",
    )(src_in, [x for x, _ in w_in])
    results = {k: v[..., :n] for k, v in results.items()}
    res: dict[str, Any] = {"status": results["status"][0], "steps": results["steps"][0]}
    # (M, S, N) -> (N, M, S): one transpose (patients-last stores keep the kernel's
    # writes coalesced)
    if want_states:
        res["states"] = jnp.moveaxis(results["states"], -1, 0)
    if want_sens:
        res["sens"] = jnp.moveaxis(results["sens"], -1, 0).reshape(n, m_dim, k_dim, s_dim)
    if data is not None:
        kk = max(k_dim, 1)
        full = np.zeros((kk, kk), np.int32)
        for t_i, (a, b) in enumerate(tri):
            full[a, b] = full[b, a] = t_i
        res["H"] = jnp.moveaxis(results["H"], -1, 0)[:, full[:k_dim, :k_dim]]
        res["g"] = jnp.moveaxis(results["g"], -1, 0)[:, :k_dim]
        res["cost"] = results["cost"][0]
    return res


def default_block(n: int, n_sm: int | None = None) -> int:
    """Patients per kernel program on a GPU for a batch of n: 128 (four warps) when the
    batch fills every streaming multiprocessor at that size, otherwise the largest of 64
    and 32 that gives one program per SM or more (a small cohort spread over many SMs
    rather than one 128-lane program on one), never under one warp."""
    if n_sm is None:
        n_sm = getattr(jax.devices()[0], "core_count", None) or 132
    for block in (128, 64):
        if -(-n // block) >= n_sm:
            return block
    return 32


def _is_zero(t) -> bool:
    return all(isinstance(x, jax.custom_derivatives.SymbolicZero)
               for x in jax.tree.leaves(t, is_leaf=lambda x: isinstance(
                   x, jax.custom_derivatives.SymbolicZero)))


class Kernel(Backend):
    """The whole cohort's solve as one fused Pallas kernel (see the module docstring).

    Attributes:
        block: patients per kernel program, a power of two (default on a GPU:
            `default_block(N)`, 32 to 128 by the batch size; the whole batch in interpret
            mode).
        warps: warps per program on a GPU (default one per 32 patients, at most 4).
        roll_stages: trace the Runge–Kutta stages as a loop, the vector field and its
            sensitivities once instead of once per stage: a Tsit5 Gauss–Newton kernel has
            a fraction of the unrolled one's code (`python -m benchmarks.kernel_ir`), which
            is what Triton's compile time grows with; its run time on a GPU against the
            unrolled kernel is measured by `benchmarks.gpu_workflow` (kernel_compile).
    """

    name: ClassVar[str] = "kernel"
    methods: ClassVar[tuple[str, ...]] = ("rk4", "tsit5", "dopri5")
    differentiation: ClassVar[tuple[str, ...]] = ("forward", "reverse")
    default_differentiation: ClassVar[str] = "forward"
    differentiates_model: ClassVar[bool] = True  # reverse mode (see `solve`)
    block: int | None = eqx.field(static=True, default=None)
    warps: int | None = eqx.field(static=True, default=None)
    roll_stages: bool = eqx.field(static=True, default=False)

    def __check_init__(self) -> None:
        if self.block is not None and (self.block < 1 or self.block & (self.block - 1)):
            raise ValueError(f"Kernel.block must be a power of two, got {self.block}")
        if self.warps is not None and self.warps < 1:
            raise ValueError(f"Kernel.warps must be >= 1, got {self.warps}")

    def _settings(self, options) -> dict:
        return dict(method=options.method, controller=options.controller,
                    max_steps=options.max_steps, block=self.block, num_warps=self.warps,
                    roll_stages=self.roll_stages)

    def _prepare(self, model, batch: Batch, options) -> Prepared:
        return prepare(model, batch, obs_cap=options.controller.dtmax == "obs")

    def solve(self, model: MechanisticModel, batch: Batch, options) -> Solution:
        """Differentiable in the parameters by forward sensitivities computed in the
        kernel (`jax.custom_jvp`): `jax.jvp`, `jax.jacfwd` and `jax.grad` work; a
        forward-mode derivative with respect to anything else raises an error. With
        `differentiation="reverse"`, `jax.grad` with respect to everything (network weights
        and schedules included) by `_reverse_solve`."""
        if options.differentiation == "reverse":
            return _reverse_solve(self, model, batch, options)
        prep = self._prepare(model, batch, options)
        arrays, static = eqx.partition(model, eqx.is_array)
        mask = batch.batched_save_times()[1]

        def run(th, arr, pr, **kw):
            return run_kernel(eqx.combine(arr, static), th, pr, **self._settings(options), **kw)

        @jax.custom_jvp
        def states(th, arr, pr, mask, active):
            res = run(th, arr, pr, active=active)
            ys = jnp.where(mask[..., None], res["states"], 0.0)
            return ys, res["status"], res["steps"]

        def states_jvp(primals, tangents):
            th, arr, pr, mask, active = primals
            dth, darr, dpr, _, _ = tangents
            if not (_is_zero(darr) and _is_zero(dpr)):
                raise NotImplementedError(
                    "in forward mode the kernel backend differentiates with respect to the "
                    "parameters only; for derivatives with respect to network weights, "
                    "schedules or times use SolverOptions(differentiation='reverse')")
            n, p_dim = th.shape
            unit = AxisDirections(tuple(range(p_dim)), jnp.ones((p_dim, n), th.dtype))
            res = run(th, arr, pr, directions=unit, want_sens=True, active=active)
            ys = jnp.where(mask[..., None], res["states"], 0.0)
            sens = jnp.where(mask[..., None, None], res["sens"], 0.0)  # (N, M, P, S)
            if isinstance(dth, jax.custom_derivatives.SymbolicZero):
                dys = jnp.zeros_like(ys)
            else:
                dys = jnp.einsum("nmps,np->nms", sens, dth)
            zeros_i = np.zeros(res["status"].shape, jax.dtypes.float0)
            return (ys, res["status"], res["steps"]), (dys, zeros_i, zeros_i)

        states.defjvp(states_jvp, symbolic_zeros=True)
        ys, status, steps = states(batch.theta, arrays, prep, mask, batch.active)
        return Solution(ts=prep.ts, ys=ys, mask=mask, status=status, num_steps=steps)

    def sensitivities(self, model: MechanisticModel, batch: Batch,
                      directions: jax.Array | AxisDirections, options
                      ) -> tuple[Solution, jax.Array]:
        """States and sensitivities along `directions` only, from one kernel."""
        prep = self._prepare(model, batch, options)
        res = run_kernel(model, batch.theta, prep, **self._settings(options),
                         directions=directions, want_sens=True, active=batch.active)
        mask = batch.batched_save_times()[1]
        sol = Solution(ts=prep.ts, ys=jnp.where(mask[..., None], res["states"], 0.0),
                       mask=mask, status=res["status"], num_steps=res["steps"])
        return sol, jnp.where(mask[..., None, None], res["sens"], 0.0)

    def normal_equations(self, model: MechanisticModel, batch: Batch,
                         directions: jax.Array | AxisDirections | None, data: FitData,
                         options) -> NormalEquations:
        """In one kernel: the cost and, with `directions`, JᵀJ and Jᵀr accumulated at the
        observations while the sensitivities are integrated (inside the error norm)."""
        prep = self._prepare(model, batch, options)
        weight = jnp.where(batch.batched_save_times()[1], data.weight, 0)
        res = run_kernel(model, batch.theta, prep, **self._settings(options),
                         directions=directions,
                         data=data._replace(weight=weight), want_states=False,
                         active=batch.active)
        if directions is None:
            return NormalEquations(res["cost"], None, None, res["status"])
        return NormalEquations(res["cost"], res["H"], res["g"], res["status"])


@eqx.filter_custom_vjp
def _reverse_kernel(diff, static, kernel: Kernel, options):
    """The kernel's forward solve of the batch `combine(diff, static)` (diff: the model's
    and the batch's float arrays); ys, status, steps."""
    model, batch = eqx.combine(diff, static)
    prep = kernel._prepare(model, batch, options)
    res = run_kernel(model, batch.theta, prep, **kernel._settings(options),
                     active=batch.active)
    mask = batch.batched_save_times()[1]
    return (jnp.where(mask[..., None], res["states"], 0.0), res["status"], res["steps"],
            prep.ts)


@_reverse_kernel.def_fwd
def _reverse_kernel_fwd(perturbed, diff, static, kernel, options):
    return _reverse_kernel(diff, static, kernel, options), None


@_reverse_kernel.def_bwd
def _reverse_kernel_bwd(residuals, grad_obj, perturbed, diff, static, kernel, options):
    # the pullback of the same integrator on arrays (what the ensemble backend runs):
    # recomputed, reverse mode through its checkpointed loop
    def ys_of(d):
        model, batch = eqx.combine(d, static)
        sol = solve_on_arrays(model, batch, options)
        return sol.ys, sol.ts

    (ys, ts), pullback = jax.vjp(ys_of, diff)
    zeros = [jnp.zeros_like(ys), jnp.zeros_like(ts)]
    cts = [zeros[i] if grad_obj[j] is None else grad_obj[j] for i, j in enumerate((0, 3))]
    return pullback(tuple(cts))[0]


def _reverse_solve(kernel: Kernel, model, batch: Batch, options) -> Solution:
    """The kernel's solve, reverse-mode differentiable with respect to all float arrays of
    the model and the batch: the forward pass runs in the kernel, the pullback is the
    ensemble backend's reverse mode through the same integrator, recomputed on arrays
    (its forward pass included). In float64 the two take the same steps and give the same
    states to rounding (tests/test_training_gradients.py), so the gradient is that of what the kernel
    computed; in float32 rounding may make them accept different steps, and the gradient
    is then that of the recomputed trajectory. A training step costs the kernel's forward
    pass on top of the ensemble's forward and reverse passes; on a GPU the ensemble
    backend may train faster (unmeasured: `benchmarks/gpu_workflow.py` times the hybrid
    config end to end)."""
    diff, static = eqx.partition((model, batch), eqx.is_inexact_array)
    ys, status, steps, ts = _reverse_kernel(diff, static, kernel, options)
    return Solution(ts=ts, ys=ys, mask=batch.batched_save_times()[1], status=status,
                    num_steps=steps)


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """`jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))`, on any host: Pallas
    kernels in `fn` are lowered to Triton IR for CUDA. Newer JAX takes the GPU's kind from
    the device or, on a host without one, from an abstract device (here `device_kind`)."""
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "AbstractDevice" not in str(e):
            raise
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    gpu = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("gpu",), abstract_device=gpu)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


_SUPPORT_CACHE: dict = {}


def kernel_support(model: MechanisticModel) -> str | None:
    """None if `model` lowers to the GPU kernel (Pallas -> Triton, checked by lowering a
    small float32 batch for CUDA, which works on any host), else the reason it does not:
    typically a vector field that is not elementwise over patients (stacking components,
    matrix products, reductions over states). Cached per model structure."""
    arrays, static = eqx.partition(model, eqx.is_array)
    key = (jax.tree.structure(arrays), tuple(np.shape(x) for x in jax.tree.leaves(arrays)),
           repr(static))
    if key in _SUPPORT_CACHE:
        return _SUPPORT_CACHE[key]
    n, f32 = 16, jnp.float32
    theta = jnp.broadcast_to(jnp.asarray(model.typical_params(), f32), (n, model.n_params))
    sched = Schedule.stack([Schedule.empty(model, f32)] * n)
    ts = jnp.broadcast_to(jnp.asarray([0.0, 1.0], f32), (n, 2))
    mask = jnp.ones((n, 2), bool)

    def solve(th, sched, ts, mask):
        prep = prepare(model, Batch(th, sched, ts, mask, f32(0.0), False))
        return run_kernel(model, th, prep, method=RK4(0.5), interpret=False,
                          block=n)["states"]

    try:
        lower_for_cuda(solve, theta, sched, ts, mask)
        reason = None
    except Exception as e:  # noqa: BLE001 - any lowering failure means "not supported"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    _SUPPORT_CACHE[key] = reason
    return reason
