"""SANA's ReLU linear attention (Triton, two launches).

For q ``[B, Nq, H, d]``, k ``[B, Nk, H, d]``, v ``[B, Nk, H, e]`` (tokens before heads, as the
projections produce them), per (batch, head)::

    state = sum_n relu(k_n) v_n^T        [d, e]   fp32
    z     = sum_n relu(k_n)              [d]      fp32
    out_n = relu(q_n) state / (relu(q_n) . z + eps)

diffusers' ``SanaLinearAttnProcessor2_0`` computes the same thing by padding v with a row of
ones and matmul-ing in fp32; its eps (1e-15) is the default here. No ``[N, N]`` matrix and no
padded copy of v exist anywhere.

Launch 1 (``_la_state_kernel``, grid ``(B*H, SPLIT, e-tiles)``): each program accumulates the
partial state and normaliser of one split of the key tokens with ``tl.dot`` (bf16/fp16 operands
multiply exactly into the fp32 accumulator; fp32 operands use 3xTF32, ~fp32 accuracy) into a
small fp32 workspace ``[B*H, SPLIT, d, e]``. Launch 2 (``_la_out_kernel``, grid
``(query tiles, B*H, e-tiles)``): sums the SPLIT partials, then one ``tl.dot`` of the relu'd query
tile (fp32) with the state, the normaliser as a row dot product, one division, one rounding.
SPLIT depends only on shapes (no host sync), so the op is CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from ._op import device_guard, spar_op
from ._triton import DOT_UPCAST, tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_tensor
from .reference import linear_attention as _ref

DEFAULT_EPS = _ref.DEFAULT_EPS
MAX_HEAD_DIM = 128          # the query/key head dim is reduced in one tile
_TARGET_PROGRAMS = 264      # ~2 waves of an H100 (132 SMs) for the state launch
_MIN_TILES_PER_SPLIT = 4    # each split of the key tokens gets at least this many BLOCK_N tiles
_MAX_SPLIT = 16
# 3xTF32: fp32 accuracy on tensor cores for fp32 operands (bf16/fp16 operands are exact anyway).
_PRECISION = "tf32x3"


@triton.jit
def _la_state_kernel(K, V, S, Z, Nk, H, D, E, E_PAD, n_per_split,
                     stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    et = tl.program_id(2)
    nsplit = tl.num_programs(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_E + tl.arange(0, BLOCK_E)
    d_mask = offs_d < D
    e_mask = offs_e < E
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, Nk)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < n_end
        kt = tl.load(k_base + n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
        kt = tl.maximum(kt, 0.0)  # relu in fp32 (exact; the interpreter's bf16 compare is wrong)
        vt = tl.load(v_base + n[:, None].to(tl.int64) * stride_vn + offs_e[None, :],
                     mask=n_mask[:, None] & e_mask[None, :], other=0.0)          # [BLOCK_N, BLOCK_E]
        if DOT_UPCAST:
            acc = tl.dot(kt, vt.to(tl.float32), acc, input_precision=PRECISION)
        else:  # bf16/fp16: back to the input dtype (exact) so the products run on tensor cores
            acc = tl.dot(kt.to(V.dtype.element_ty), vt, acc, input_precision=PRECISION)
        z += tl.sum(kt, axis=1)
    slot = (bh * nsplit + split).to(tl.int64)
    tl.store(S + slot * (BLOCK_D * E_PAD) + offs_d[:, None] * E_PAD + offs_e[None, :], acc)
    if et == 0:
        tl.store(Z + slot * BLOCK_D + offs_d, z)


@triton.jit
def _la_out_kernel(Q, S, Z, O, Nq, H, D, E, E_PAD, nsplit, eps,
                   stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    et = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_E + tl.arange(0, BLOCK_E)
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, nsplit):
        slot = (bh * nsplit + s).to(tl.int64)
        state += tl.load(S + slot * (BLOCK_D * E_PAD) + offs_d[:, None] * E_PAD + offs_e[None, :])
        z += tl.load(Z + slot * BLOCK_D + offs_d)
    n_mask = offs_n < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_n[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    q = tl.maximum(q, 0.0)
    num = tl.dot(q, state, input_precision=PRECISION)                            # [BLOCK_N, BLOCK_E]
    den = tl.sum(q * z[None, :], axis=1) + eps
    o = num / den[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_n[:, None].to(tl.int64) * stride_on + offs_e[None, :],
             o.to(O.dtype.element_ty), mask=n_mask[:, None] & (offs_e[None, :] < E))


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# Per BLOCK_D (the padded q/k head dim) and operand width (fp32 needs ~2x the registers: 3xTF32
# splits each operand in two): BLOCK_E (value columns per program, shared by both launches),
# (BLOCK_N, num_warps) of the state launch and of the output launch. Chosen so that nothing
# spills on sm_80 / sm_90a (python -m spar_kernels.inspect --kernel linear_attention).
_CONFIGS = {
    # bd: {fp32?: (BLOCK_E, (state BLOCK_N, warps), (out BLOCK_N, warps))}
    16: {False: (16, (64, 4), (128, 4)), True: (16, (64, 4), (128, 4))},
    32: {False: (32, (64, 4), (128, 4)), True: (32, (64, 4), (128, 4))},
    64: {False: (64, (64, 4), (64, 4)), True: (64, (32, 8), (64, 4))},
    128: {False: (32, (32, 4), (64, 8)), True: (32, (32, 8), (64, 8))},
}


def _config(D: int, dtype: torch.dtype):
    bd = _block_d(D)
    be, st, ou = _CONFIGS[bd][dtype == torch.float32]
    return bd, be, st, ou


def _split(B: int, H: int, Nk: int, n_etiles: int, block_n: int) -> tuple[int, int]:
    """(SPLIT, tokens per split) for the state launch: enough programs to fill a GPU."""
    tiles = triton.cdiv(max(Nk, 1), block_n)
    split = max(1, min(_MAX_SPLIT, tiles // _MIN_TILES_PER_SPLIT,
                       triton.cdiv(_TARGET_PROGRAMS, B * H * n_etiles)))
    per = triton.cdiv(tiles, split) * block_n
    return triton.cdiv(max(Nk, 1), per), per


@_aot.register
def _aot_specs():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = _aot.TRITON_DTYPE[dtype]
        for bd in sorted(_CONFIGS):
            be, (bn, warps), (bn2, warps2) = _CONFIGS[bd][dtype == torch.float32]
            yield _aot.AOTSpec(
                kernel_name="linear_attention_state", fn=_la_state_kernel,
                config=f"{t} BLOCK_D={bd} BLOCK_E={be} BLOCK_N={bn} warps={warps}",
                types={"K": f"*{t}", "V": f"*{t}", "S": "*fp32", "Z": "*fp32", "stride_kb": "i64",
                       "stride_kn": "i64", "stride_kh": "i64", "stride_vb": "i64", "stride_vn": "i64",
                       "stride_vh": "i64"},
                constexprs={"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_E": be,
                            "DOT_UPCAST": False, "PRECISION": _PRECISION},
                num_warps=warps, num_stages=2, aligned=("K", "V", "S", "Z"),
                expect_mma=bd >= 64)  # M = BLOCK_D: wgmma needs 64 rows; below, mma.sync is fine
            bn, warps = bn2, warps2
            yield _aot.AOTSpec(
                kernel_name="linear_attention_out", fn=_la_out_kernel,
                config=f"{t} BLOCK_D={bd} BLOCK_E={be} BLOCK_N={bn} warps={warps}",
                types={"Q": f"*{t}", "S": "*fp32", "Z": "*fp32", "O": f"*{t}", "eps": "fp32",
                       "stride_qb": "i64", "stride_qn": "i64", "stride_qh": "i64", "stride_ob": "i64",
                       "stride_on": "i64", "stride_oh": "i64"},
                constexprs={"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_E": be,
                            "PRECISION": _PRECISION},
                num_warps=warps, num_stages=1, aligned=("Q", "S", "Z", "O"), expect_mma=True)


# ---------------------------------------------------------------------------------------------
# implementations (write into the preallocated out)


def _impl_triton(q, k, v, eps, out):
    B, Nq, H, D = q.shape
    Nk, E = k.shape[1], v.shape[-1]
    bd, be, (bn1, w1), (bn2, w2) = _config(D, q.dtype)
    be = min(be, max(16, triton.next_power_of_2(E)))
    n_et = triton.cdiv(E, be)
    e_pad = n_et * be
    split, per = _split(B, H, Nk, n_et, bn1)
    ws_s = torch.empty(B * H * split * bd * e_pad, dtype=torch.float32, device=q.device)
    ws_z = torch.empty(B * H * split * bd, dtype=torch.float32, device=q.device)
    with device_guard(q):
        _la_state_kernel[(B * H, split, n_et)](
            k, v, ws_s, ws_z, Nk, H, D, E, e_pad, per, k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), BLOCK_N=bn1, BLOCK_D=bd, BLOCK_E=be,
            DOT_UPCAST=DOT_UPCAST, PRECISION=_PRECISION, num_warps=w1, num_stages=2)
        if Nq:
            _la_out_kernel[(triton.cdiv(Nq, bn2), B * H, n_et)](
                q, ws_s, ws_z, out, Nq, H, D, E, e_pad, split, eps, q.stride(0), q.stride(1), q.stride(2),
                out.stride(0), out.stride(1), out.stride(2), BLOCK_N=bn2, BLOCK_D=bd, BLOCK_E=be,
                PRECISION=_PRECISION, num_warps=w2, num_stages=1)


def _impl_reference(q, k, v, eps, out):
    out.copy_(_ref.linear_attention(q, k, v, eps))


_CPU_TWIN_DIMS = (16, 32, 64)  # head dims (d == e) compiled into the C++ twin (csrc/linear_attention/)


def _impl_cpu(q, k, v, eps, out):
    B, Nq, H, D = q.shape
    E = v.shape[-1]
    if D == E and D in _CPU_TWIN_DIMS:  # the C++ twin: register-blocked state, OpenMP over heads
        if _ext.cpu_twin("linear_attention")(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ext.dtype_code(q), B, Nq, k.shape[1], H,
                                D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], out.data_ptr(),
                                *out.stride()[:3], eps):
            return
    # other head dims: two batched BLAS matmuls per sample: the state with the normaliser appended
    # as one extra column ([H, d, e+1], a few KB), then relu(q) against it. No [N, N], no padded v.
    for b in range(B):
        kr = torch.relu(k[b]).float().permute(1, 2, 0)          # [H, d, Nk]
        aug = torch.empty(H, D, E + 1, dtype=torch.float32, device=q.device)
        torch.matmul(kr, v[b].float().transpose(0, 1), out=aug[:, :, :E])
        torch.sum(kr, dim=2, out=aug[:, :, E])
        qr = torch.relu(q[b]).float().transpose(0, 1)            # [H, Nq, d]
        num = torch.matmul(qr, aug)                              # [H, Nq, e+1]
        res = num[:, :, :E] / (num[:, :, E:] + eps)
        out[b].copy_(res.transpose(0, 1))


_IMPLS = {"triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("linear_attention", mutates_args=("out",), impls=_IMPLS)
def _linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, out: torch.Tensor) -> None: ...


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = DEFAULT_EPS,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU linear attention (SANA), fp32 accumulation.

    Args:
        q: ``[B, Nq, H, d]`` float32 / float16 / bfloat16 (tokens before heads), any strides.
        k: ``[B, Nk, H, d]``, q's dtype and device.
        v: ``[B, Nk, H, e]``, q's dtype and device (e = d in SANA).
        eps: added to the normaliser ``relu(q_n) . sum_n relu(k_n)``; default 1e-15, as diffusers'
            ``SanaLinearAttnProcessor2_0``.
        out: optional contiguous ``[B, Nq, H, e]`` output of q's dtype (view it as
            ``[B, Nq, H*e]`` for the output projection).

    Returns:
        ``out``; d up to 128 (e is free: value columns are tiled).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, Nq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k: expected shape [{B}, Nk, {H}, {D}] (q's batch, heads and head dim), "
                         f"got shape {tuple(k.shape)}")
    Nk = k.shape[1]
    if v.shape[0] != B or v.shape[1] != Nk or v.shape[2] != H:
        raise ValueError(f"v: expected shape [{B}, {Nk}, {H}, e] (k's batch, tokens and heads), "
                         f"got shape {tuple(v.shape)}")
    E = v.shape[3]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last dimension) must be in [1, {MAX_HEAD_DIM}], got shape {tuple(q.shape)}")
    if E < 1:
        raise ValueError(f"v: head dim (last dimension) must be at least 1, got shape {tuple(v.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    shape = (B, Nq, H, E)
    if out is None:
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    else:
        check_out("out", out, shape, q.dtype, q.device)
    if out.numel():
        _linear_attention_op(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), float(eps), out)
    return out
