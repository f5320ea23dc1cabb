"""Accuracy helpers every kernel test uses.

- :func:`fp64` / :func:`to_fp64`: run a reference in float64 on copies of the inputs;
- :data:`TOLERANCES`: per-dtype (atol, rtol) for element-wise ops;
- :func:`assert_close_fa`: the FlashAttention rule ``err(kernel) <= 2 * err(torch, same dtype) + atol``,
  errors measured against an fp64 reference;
- :func:`mismatch_report`: worst indices, NaN/inf counts, a summary that makes a failure readable;
- :func:`poison` / :func:`poisoned_empty`: fill outputs with NaN before a run so that elements a
  kernel never writes fail the comparison;
- :func:`fake_cuda`: run code on a simulated CUDA device and count its launches, host syncs,
  host-to-device copies and memory (:mod:`spar_kernels._fake_cuda`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._fake_cuda import FakeCudaRecorder, fake_cuda  # noqa: F401  (re-exported)

# (atol, rtol) for comparing an op's output in a dtype with a reference of the same math.
# Values reflect one or two roundings of the output dtype (eps: fp32 1.2e-7, fp16 9.8e-4,
# bf16 7.8e-3) plus fp32-accumulation reordering.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1.3e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
    torch.float8_e4m3fn: (0.125, 0.125),
}

# Default atol of the FlashAttention rule per dtype.
FA_ATOL: dict[torch.dtype, float] = {
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``{"atol": .., "rtol": ..}`` for ``dtype``, usable as ``torch.testing.assert_close(**tolerance(dt))``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def to_fp64(x: Any) -> Any:
    """Recursively copy floating tensors to float64 (other values pass through)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(to_fp64(v) for v in x)
    if isinstance(x, dict):
        return {k: to_fp64(v) for k, v in x.items()}
    return x


def fp64(fn: Callable, *args, **kwargs):
    """Run ``fn`` with every floating tensor argument upcast to float64."""
    return fn(*to_fp64(args), **to_fp64(kwargs))


def _finite_pair(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double(), b.double()
    both_inf_same = torch.isinf(a) & torch.isinf(b) & (a == b)
    return a, b, both_inf_same


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |a - ref| with NaN anywhere in ``a`` (and not in ref) counted as infinite error;
    matching infinities count as zero error."""
    a, ref, same_inf = _finite_pair(a, ref)
    d = (a - ref).abs()
    d = torch.where(same_inf, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(a) & ~torch.isnan(ref), torch.full_like(d, float("inf")), d)
    d = torch.where(torch.isnan(a) & torch.isnan(ref), torch.zeros_like(d), d)
    return float(d.max()) if d.numel() else 0.0


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
                    top: int = 5, name: str = "output") -> str:
    """Human-readable summary of where ``actual`` differs from ``expected``."""
    a, e, same_inf = _finite_pair(actual.detach().cpu(), expected.detach().cpu())
    lines = [f"{name}: shape {tuple(actual.shape)} dtype {actual.dtype} vs expected {expected.dtype}"]
    n_nan, n_inf = int(torch.isnan(a).sum()), int(torch.isinf(a).sum())
    e_nan, e_inf = int(torch.isnan(e).sum()), int(torch.isinf(e).sum())
    lines.append(f"  NaN: {n_nan} (expected {e_nan}), inf: {n_inf} (expected {e_inf})")
    d = (a - e).abs()
    d = torch.where(same_inf | (torch.isnan(a) & torch.isnan(e)), torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    bad = d > atol + rtol * e.abs().nan_to_num(0.0, 0.0, 0.0)
    lines.append(f"  mismatched: {int(bad.sum())} / {a.numel()} (atol {atol:g}, rtol {rtol:g}); "
                 f"max abs err {float(d.max()) if d.numel() else 0.0:.4g}")
    if d.numel():
        flat = d.flatten()
        k = min(top, flat.numel())
        vals, idx = flat.topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            nd = tuple(int(t) for t in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
            lines.append(f"    at {nd}: got {float(a.flatten()[i]):.6g}, expected {float(e.flatten()[i]):.6g} "
                         f"(|diff| {v:.3g})")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | None = None,
                 rtol: float | None = None, name: str = "output") -> None:
    """Element-wise ``|a - e| <= atol + rtol |e|`` with the per-dtype table as default; NaN in
    ``actual`` fails unless ``expected`` has NaN there. Raises AssertionError with a report."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_atol, d_rtol = TOLERANCES.get(actual.dtype, (0.0, 0.0))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e, same_inf = _finite_pair(actual.detach().cpu(), expected.detach().cpu())
    d = (a - e).abs()
    ok = (d <= atol + rtol * e.abs()) | same_inf | (torch.isnan(a) & torch.isnan(e))
    if not bool(ok.all()):
        raise AssertionError(mismatch_report(actual, expected, atol=atol, rtol=rtol, name=name))


# How far PyTorch's own computation may be from the float64 one, relative to the largest
# reference value, before assert_close_fa calls the pair inconsistent: low-precision roundings
# through a whole model stay near 1e-2 (a bf16 model's logits cast to fp32: 8e-3), a reference
# computing other math is off by O(1).
FA_BASELINE_RTOL = 0.1


def assert_close_fa(actual: torch.Tensor, baseline: torch.Tensor, reference64: torch.Tensor, *,
                    atol: float | None = None, factor: float = 2.0, name: str = "output",
                    baseline_rtol: float = FA_BASELINE_RTOL) -> None:
    """The FlashAttention accuracy rule.

    ``baseline`` is PyTorch's own computation in the same low precision as ``actual``;
    ``reference64`` the same math in float64. Passes when
    ``max|actual - ref64| <= factor * max|baseline - ref64| + atol``.

    The rule alone would pass a wrong reference (actual and baseline then miss it by the same
    amount), so the baseline must also be within ``baseline_rtol`` of the reference's largest
    value (+ atol): otherwise the two compute different things and the call fails.
    """
    if actual.shape != reference64.shape or baseline.shape != reference64.shape:
        raise AssertionError(f"{name}: shapes differ: actual {tuple(actual.shape)}, baseline "
                             f"{tuple(baseline.shape)}, reference {tuple(reference64.shape)}")
    atol = FA_ATOL.get(actual.dtype, 1e-6) if atol is None else atol
    ref = reference64.detach().cpu()
    err = max_abs_err(actual.detach().cpu(), ref)
    base = max_abs_err(baseline.detach().cpu(), ref)
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    rtol = baseline_rtol
    if not base <= rtol * scale + atol:
        raise AssertionError(
            f"{name}: the {baseline.dtype} baseline is {base:.4g} from the float64 reference (largest |value| "
            f"{scale:.4g}; at most {rtol:g} of it + atol {atol:g} expected): the baseline and the reference "
            "compute different things, so the rule cannot judge the result against them\n"
            + mismatch_report(baseline, ref, atol=rtol * scale + atol, name=f"{name} baseline"))
    if not err <= factor * base + atol:
        raise AssertionError(
            f"{name}: FlashAttention rule failed: err {err:.4g} > {factor:g} * torch err {base:.4g} + atol {atol:g}\n"
            + mismatch_report(actual, reference64, atol=factor * base + atol, name=name))


def poison(*tensors: torch.Tensor) -> None:
    """Fill output buffers with NaN (floats) or a sentinel (ints) so unwritten elements show."""
    for t in tensors:
        if t is None:
            continue
        if t.is_floating_point():
            if t.dtype == torch.float8_e4m3fn:
                t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
            else:
                t.fill_(float("nan"))
        else:
            t.fill_(-0x7FFF_FFFF if t.dtype in (torch.int32, torch.int64) else 0x7F)


def poisoned_empty(*shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    poison(t)
    return t


def non_contiguous(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """A strided view holding the same values as ``x`` (every other element along ``dim`` of a
    twice-as-large buffer), for testing kernels on non-contiguous inputs."""
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim] *= 2
    buf = torch.empty(shape, dtype=x.dtype, device=x.device)
    poison(buf)
    view = buf[tuple(slice(None, None, 2) if d == dim else slice(None) for d in range(x.dim()))]
    view.copy_(x)
    return view
