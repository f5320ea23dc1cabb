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
small fp32 workspace ``[B*H, SPLIT, d, e]``. Launch 2 (``_la_out_kernel``, a 1-D grid of
query tiles x e-tiles x B*H, so no count meets the 65535 limit of grid axes y and z): sums the
SPLIT partials, then one ``tl.dot`` of the relu'd query tile (fp32) with the state, the normaliser
as a row dot product, one division, one rounding. SPLIT depends only on shapes (no host sync);
with ``out=`` and ``workspace=`` (:func:`linear_attention_workspace`, allocated once per shape) a
call allocates nothing, so it can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from . import _fp8_out as _fp8
from ._backend import current_backend
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
# The FP8-output launch: a program owns whole token rows across all heads, so the query tile is
# the smallest a dot takes, for as many programs as the token count allows.
_FP8_BLOCK_N = 16
_FP8_WARPS = {16: 2, 32: 4, 64: 4, 128: 4}   # per BLOCK_D; 4 at 16 spilled 8 bytes on sm_80 (bf16, d=12)


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
        kt = tl.where(kt < 0.0, 0.0, kt)  # relu in fp32, NaN kept (the interpreter's bf16 compare is wrong)
        vt = tl.load(v_base + n[:, None].to(tl.int64) * stride_vn + offs_e[None, :],
                     mask=n_mask[:, None] & e_mask[None, :], other=0.0)          # [BLOCK_N, BLOCK_E]
        if DOT_UPCAST:
            acc = tl.dot(kt, vt.to(tl.float32), acc, input_precision=PRECISION)
        else:  # bf16/fp16: back to the input dtype (exact) so the products run on tensor cores
            acc = tl.dot(kt.to(V.dtype.element_ty), vt, acc, input_precision=PRECISION)
        z += tl.sum(kt, axis=1)
    slot = bh.to(tl.int64) * nsplit + split
    # padded key dims: 0 * v there, NaN for an infinite v, which the output's dot would carry into
    # the column (times q's zero padding); the reference has no such rows
    acc = tl.where(d_mask[:, None], acc, 0.0)
    tl.store(S + slot * (BLOCK_D * E_PAD) + offs_d[:, None] * E_PAD + offs_e[None, :], acc)
    if et == 0:
        tl.store(Z + slot * BLOCK_D + offs_d, z)


@triton.jit
def _la_out_tile(Q, S, Z, b, h, bh, offs_n, offs_d, offs_e, n_mask, Nq, D, E_PAD, nsplit, eps,
                 stride_qb, stride_qn, stride_qh, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``relu(q) state / (relu(q) . z + eps)`` (fp32) of query rows offs_n, head h, value
    columns offs_e: the SPLIT partial states summed, one dot, one division."""
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, nsplit):
        slot = bh.to(tl.int64) * nsplit + s
        state += tl.load(S + slot * (BLOCK_D * E_PAD) + offs_d[:, None] * E_PAD + offs_e[None, :])
        z += tl.load(Z + slot * BLOCK_D + offs_d)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_n[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    q = tl.where(q < 0.0, 0.0, q)  # relu, NaN kept (as torch.relu)
    num = tl.dot(q, state, input_precision=PRECISION)                            # [BLOCK_N, BLOCK_E]
    den = tl.sum(q * z[None, :], axis=1) + eps
    return num / den[:, None]


# nsplit is not specialized: at nsplit == 1 (every SANA shape up to ~1k tokens) the constant split
# loop raised sm_80's registers past 255 and spilled (python -m spar_kernels.inspect).
@triton.jit(do_not_specialize=["nsplit"])
def _la_out_kernel(Q, S, Z, O, Nq, H, D, E, E_PAD, nsplit, n_qtiles, n_etiles, eps,
                   stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                   PRECISION: tl.constexpr):
    # one axis: (query tile, value tile, batch x head) folded into program_id(0), so that no count
    # meets the 65535 limit of grid axes y / z (B*H passes it at ~936 samples x 70 heads)
    pid = tl.program_id(0)
    pid_n = pid % n_qtiles
    rest = pid // n_qtiles
    et = rest % n_etiles
    bh = rest // n_etiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_E + tl.arange(0, BLOCK_E)
    n_mask = offs_n < Nq
    o = _la_out_tile(Q, S, Z, b, h, bh, offs_n, offs_d, offs_e, n_mask, Nq, D, E_PAD, nsplit, eps,
                     stride_qb, stride_qn, stride_qh, BLOCK_D, BLOCK_E, PRECISION)
    tl.store(O + b * stride_ob + h * stride_oh + offs_n[:, None].to(tl.int64) * stride_on + offs_e[None, :],
             o.to(O.dtype.element_ty), mask=n_mask[:, None] & (offs_e[None, :] < E))


# H and n_etiles are not specialized either: at H == 1 the constant head loop spilled on sm_90a
@triton.jit(do_not_specialize=["nsplit", "H", "n_etiles"])
def _la_out_fp8_kernel(Q, S, Z, Q8, S8, Nq, H, D, E, E_PAD, nsplit, n_qtiles, n_etiles, eps,
                       stride_qb, stride_qn, stride_qh,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                       PRECISION: tl.constexpr):
    # The FP8-output variant of the output launch: a token's scale spans all H heads, so a program
    # owns BLOCK_N whole token rows of one sample and walks (head, value tile) twice: the rows'
    # amax of the outputs rounded to q's dtype (the output dtype), then the codes (Q8: [B*Nq, H*E] contiguous bytes) and the scales (S8[token]); the tiles are
    # recomputed, not kept (bit-identical: the same instructions on the same inputs).
    pid = tl.program_id(0)
    pid_n = pid % n_qtiles
    b = (pid // n_qtiles).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < Nq
    OUT_TY = Q.dtype.element_ty
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, H * n_etiles):
        h = (i // n_etiles).to(tl.int64)
        offs_e = (i % n_etiles) * BLOCK_E + tl.arange(0, BLOCK_E)
        o = _la_out_tile(Q, S, Z, b, h, b * H + h, offs_n, offs_d, offs_e, n_mask, Nq, D, E_PAD, nsplit, eps,
                         stride_qb, stride_qn, stride_qh, BLOCK_D, BLOCK_E, PRECISION).to(OUT_TY).to(tl.float32)
        amax = _fp8.running_amax(amax, tl.where(offs_e[None, :] < E, o, 0.0), 1)
    scale = _fp8.fp8_scale(amax)                                               # [BLOCK_N]
    tok = b * Nq + offs_n.to(tl.int64)
    for i in range(0, H * n_etiles):
        h = (i // n_etiles).to(tl.int64)
        offs_e = (i % n_etiles) * BLOCK_E + tl.arange(0, BLOCK_E)
        o = _la_out_tile(Q, S, Z, b, h, b * H + h, offs_n, offs_d, offs_e, n_mask, Nq, D, E_PAD, nsplit, eps,
                         stride_qb, stride_qn, stride_qh, BLOCK_D, BLOCK_E, PRECISION).to(OUT_TY).to(tl.float32)
        tl.store(Q8 + tok[:, None] * (H * E) + h * E + offs_e[None, :], _fp8.quantize_codes(o, scale[:, None]),
                 mask=n_mask[:, None] & (offs_e[None, :] < E))
    tl.store(S8 + tok, scale, mask=n_mask)


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


class _Plan:
    """The launch geometry of one call, from shapes and dtype only (no host sync)."""

    def __init__(self, B: int, Nq: int, Nk: int, H: int, D: int, E: int, dtype: torch.dtype):
        self.bd, be, (self.bn1, self.w1), (self.bn2, self.w2) = _config(D, dtype)
        if D != self.bd and self.bd >= 32:
            # a head dim below the tile's masks the k loads: half the key tile keeps the state
            # launch from spilling (32 bytes on sm_90a at D=24, 8 on sm_80 at D=48)
            self.bn1 //= 2
        self.be = min(be, max(16, triton.next_power_of_2(E)))
        self.n_et = triton.cdiv(E, self.be)
        self.e_pad = self.n_et * self.be
        self.split, self.per = _split(B, H, Nk, self.n_et, self.bn1)
        self.n_qt = triton.cdiv(Nq, self.bn2)
        slots = B * H * self.split
        self.s_numel = slots * self.bd * self.e_pad      # partial states [B*H, SPLIT, BLOCK_D, E_PAD]
        self.numel = self.s_numel + slots * self.bd      # + partial normalisers [B*H, SPLIT, BLOCK_D]

    def launches(self, q, k, v, out, workspace, eps: float, fp8_out=None):
        """[(kernel, grid, args, constexprs, num_warps, num_stages)]: what :func:`_impl_triton`
        launches and what the AOT specs compile (one description, so they cannot drift).
        ``fp8_out``: the ``(q8, scales)`` buffers of the FP8-output variant (``out`` is unused)."""
        B, Nq, H, D = q.shape
        Nk, E = k.shape[1], v.shape[-1]
        ws_s = workspace.narrow(0, 0, self.s_numel)
        ws_z = workspace.narrow(0, self.s_numel, self.numel - self.s_numel)
        state = dict(K=k, V=v, S=ws_s, Z=ws_z, Nk=Nk, H=H, D=D, E=E, E_PAD=self.e_pad, n_per_split=self.per,
                     stride_kb=k.stride(0), stride_kn=k.stride(1), stride_kh=k.stride(2), stride_vb=v.stride(0),
                     stride_vn=v.stride(1), stride_vh=v.stride(2))
        run = [(_la_state_kernel, (B * H, self.split, self.n_et), state,
                dict(BLOCK_N=self.bn1, BLOCK_D=self.bd, BLOCK_E=self.be, DOT_UPCAST=DOT_UPCAST, PRECISION=_PRECISION),
                self.w1, 2)]
        if Nq and fp8_out is not None:
            n_qt = triton.cdiv(Nq, _FP8_BLOCK_N)
            o = dict(Q=q, S=ws_s, Z=ws_z, Q8=fp8_out[0].view(torch.uint8), S8=fp8_out[1], Nq=Nq, H=H, D=D, E=E,
                     E_PAD=self.e_pad, nsplit=self.split, n_qtiles=n_qt, n_etiles=self.n_et, eps=eps,
                     stride_qb=q.stride(0), stride_qn=q.stride(1), stride_qh=q.stride(2))
            run.append((_la_out_fp8_kernel, (n_qt * B,), o,
                        dict(BLOCK_N=_FP8_BLOCK_N, BLOCK_D=self.bd, BLOCK_E=self.be, PRECISION=_PRECISION),
                        _FP8_WARPS[self.bd], 1))
        elif Nq:
            o = dict(Q=q, S=ws_s, Z=ws_z, O=out, Nq=Nq, H=H, D=D, E=E, E_PAD=self.e_pad, nsplit=self.split,
                     n_qtiles=self.n_qt, n_etiles=self.n_et, eps=eps, stride_qb=q.stride(0), stride_qn=q.stride(1),
                     stride_qh=q.stride(2), stride_ob=out.stride(0), stride_on=out.stride(1),
                     stride_oh=out.stride(2))
            run.append((_la_out_kernel, (self.n_qt * self.n_et * B * H,), o,
                        dict(BLOCK_N=self.bn2, BLOCK_D=self.bd, BLOCK_E=self.be, PRECISION=_PRECISION), self.w2, 1))
        return run


def _aot_launches():
    """Launches at the shapes that matter, for every dtype and BLOCK_D config: SANA's self-attention
    (B=2 CFG batch, 36 / 70 heads, head dim 32, 256 / 1024 / 4096 tokens: one key split and several;
    q/k/v as separate projections or as views of one fused q/k/v projection), each BLOCK_D at its
    full head dim with long and short sequences, and a ragged case (one head, odd sizes, head dim not
    a multiple of 16). Triton specializes integers equal to 1 and multiples of 16 at run time; the
    specs come from the same arguments, so they compile what a GPU runs."""
    meta = dict(device="meta")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases = []
        for bd in sorted(_CONFIGS):
            for B, N, H in ((2, 4096, 36), (2, 256, 36)):
                cases.append((B, N, H, bd, False))
            cases.append((1, 37, 1, bd * 3 // 4, False))
        cases += [(2, 256, 70, 32, True), (2, 1024, 70, 32, False), (2, 4096, 70, 32, True)]
        for B, N, H, D, fused in cases:
            if fused:
                qkv = torch.empty(B, N, 3, H, D, dtype=dtype, **meta)
                q, k, v = qkv.unbind(2)
            else:
                q, k, v = (torch.empty(B, N, H, D, dtype=dtype, **meta) for _ in range(3))
            out = torch.empty(B, N, H, D, dtype=dtype, **meta)
            plan = _Plan(B, N, N, H, D, D, dtype)
            ws = torch.empty(plan.numel, dtype=torch.float32, **meta)
            yield dtype, plan, plan.launches(q, k, v, out, ws, DEFAULT_EPS)
            if dtype != torch.float16:  # the FP8 runtime's dtypes: the FP8-output launch too
                fp8_out = (torch.empty(B, N, H, D, dtype=_fp8.FP8, **meta),
                           torch.empty(B, N, 1, dtype=torch.float32, **meta))
                yield dtype, plan, plan.launches(q, k, v, None, ws, DEFAULT_EPS, fp8_out)[1:]


@_aot.register
def _aot_specs():
    specs = []
    for dtype, plan, launches in _aot_launches():
        t = _aot.TRITON_DTYPE[dtype]
        for fn, _grid, args, consts, warps, stages in launches:
            consts = dict(consts, DOT_UPCAST=False) if "DOT_UPCAST" in consts else consts
            state = fn is _la_state_kernel
            bn = consts["BLOCK_N"]
            name = {_la_state_kernel: "linear_attention_state", _la_out_kernel: "linear_attention_out",
                    _la_out_fp8_kernel: "linear_attention_out_fp8"}[fn]
            specs.append(_aot.launch_spec(
                name, fn,
                f"{t} BLOCK_D={plan.bd} BLOCK_E={plan.be} BLOCK_N={bn} warps={warps} "
                f"D={args['D']} H={args['H']} split={plan.split}", args, consts, num_warps=warps,
                num_stages=stages,
                # the state launch's M is BLOCK_D and the FP8 output launch's 16 query rows: wgmma
                # needs 64 rows; below, mma.sync is fine
                expect_mma=plan.bd >= 64 if state else fn is _la_out_kernel))
    return _aot.unique(specs)


# ---------------------------------------------------------------------------------------------
# implementations (write into the preallocated out)


def _launch(q, k, v, eps, out, workspace, fp8_out=None):
    """Run the Triton plan of q/k/v into ``out`` (or, with ``fp8_out`` = (q8, scales), FP8)."""
    B, Nq, H, D = q.shape
    plan = _Plan(B, Nq, k.shape[1], H, D, v.shape[-1], q.dtype)
    if workspace.numel() < plan.numel:
        if workspace.numel():
            raise ValueError(f"workspace: expected a contiguous fp32 tensor of at least {plan.numel} elements "
                             f"(linear_attention_workspace(q, k, v)), got shape {tuple(workspace.shape)}")
        # CPU tensors under the interpreter, called without a workspace
        workspace = torch.empty(plan.numel, dtype=torch.float32, device=q.device)
    with device_guard(q):
        for kernel, grid, args, consts, warps, stages in plan.launches(q, k, v, out, workspace, eps, fp8_out):
            kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _impl_triton(q, k, v, eps, out, workspace):
    _launch(q, k, v, eps, out, workspace)


def _impl_reference(q, k, v, eps, out, workspace):
    out.copy_(_ref.linear_attention(q, k, v, eps))


def _fp8_triton(q, k, v, eps, q8, scales, workspace):
    _launch(q, k, v, eps, None, workspace, (q8, scales))


def _fp8_unfused(impl, quantize):
    """The CPU / reference FP8 output: the op into a scratch output, then quantize_fp8's per-token
    rows ([B*Nq, H*e]), inside the one op."""
    def run(q, k, v, eps, q8, scales, workspace):
        y = torch.empty(q8.shape, dtype=q.dtype, device=q.device)
        impl(q, k, v, eps, y, workspace)
        quantize(y.view(y.shape[0], y.shape[1], -1), q8, scales)
    return run


_CPU_TWIN_DIMS = (16, 32, 64)  # head dims (d == e) compiled into the C++ twin (csrc/linear_attention/)


_FP32_TINY = torch.finfo(torch.float32).tiny


def _impl_cpu(q, k, v, eps, out, workspace):
    B, Nq, H, D = q.shape
    E = v.shape[-1]
    # the C++ twin multiplies by 1 / (den + eps): with eps 0 or below fp32's smallest normal number
    # that reciprocal overflows where den is 0 or subnormal (0 * inf, or inf where num / den is
    # finite), so such an eps takes the dividing matmul path
    if D == E and D in _CPU_TWIN_DIMS and not 0 <= eps < _FP32_TINY:  # the C++ twin: register-blocked state
        if _ext.cpu_twin("linear_attention")(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ext.dtype_code(q), B, Nq,
                                             k.shape[1], H, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                             out.data_ptr(), *out.stride()[:3], eps):
            return
    _cpu_matmuls(q, k, v, eps, out)


def _cpu_matmuls(q, k, v, eps, out):
    """Head dims the twin does not take: two batched BLAS matmuls per sample: the state with the
    normaliser appended as one extra column ([H, d, e+1], a few KB), then relu(q) against it.
    No [N, N] matrix, no padded copy of v."""
    B, Nq, H, D = q.shape
    E = v.shape[-1]
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


@spar_op("linear_attention", mutates_args=("out", "workspace"), impls=_IMPLS)
def _linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, out: torch.Tensor,
                         workspace: torch.Tensor) -> None: ...


_FP8_IMPLS = {"triton": _fp8_triton, "cpu": _fp8_unfused(_impl_cpu, _fp8.quantize_rows_cpu),
              "reference": _fp8_unfused(_impl_reference, _fp8.quantize_rows_reference)}


@spar_op("linear_attention_fp8", mutates_args=("q8", "scales", "workspace"), impls=_FP8_IMPLS)
def _linear_attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, q8: torch.Tensor,
                             scales: torch.Tensor, workspace: torch.Tensor) -> None: ...


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _workspace_numel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, triton_path: bool) -> int:
    """fp32 elements of workspace the Triton launches need (partial states); 0 for the CPU and
    reference implementations."""
    if not triton_path:
        return 0
    B, Nq, H, D = q.shape
    return _Plan(B, Nq, k.shape[1], H, D, v.shape[-1], q.dtype).numel


def linear_attention_workspace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A workspace for :func:`linear_attention` calls with these shapes, dtype and device.

    It depends only on the shapes (``B``, ``Nq``, ``Nk``, ``H``, ``d``, ``e``) and the dtype: allocate
    it once per shape (e.g. in a runtime's plan) and pass it as ``workspace=`` to every call, so a
    captured CUDA graph allocates nothing. Empty (0 elements) where the CPU implementation runs
    (CPU tensors, unless ``spar_kernels.backend("triton")`` is active).
    """
    _check_inputs(q, k, v)
    triton_path = q.device.type != "cpu" or current_backend() == "triton"
    return torch.empty(_workspace_numel(q, k, v, triton_path), dtype=torch.float32, device=q.device)


def _check_inputs(q, k, v) -> None:
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
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last dimension) must be in [1, {MAX_HEAD_DIM}], got shape {tuple(q.shape)}")
    if v.shape[3] < 1:
        raise ValueError(f"v: head dim (last dimension) must be at least 1, got shape {tuple(v.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = DEFAULT_EPS,
                     out=None, workspace: torch.Tensor | None = None, fp8: bool = False):
    """ReLU linear attention (SANA), fp32 accumulation.

    Args:
        q: ``[B, Nq, H, d]`` float32 / float16 / bfloat16 (tokens before heads), any strides.
        k: ``[B, Nk, H, d]``, q's dtype and device.
        v: ``[B, Nk, H, e]``, q's dtype and device (e = d in SANA).
        eps: added to the normaliser ``relu(q_n) . sum_n relu(k_n)``; default 1e-15, as diffusers'
            ``SanaLinearAttnProcessor2_0``.
        out: optional contiguous ``[B, Nq, H, e]`` output of q's dtype (view it as
            ``[B, Nq, H*e]`` for the output projection).
        workspace: optional fp32 tensor from :func:`linear_attention_workspace` for these shapes
            (contiguous, on q's device, at least that many elements); the GPU path keeps the
            per-split partial states in it. Without it the call allocates one (with it and ``out``
            the call allocates nothing).
        fp8: return the output quantized per token for ``torch._scaled_mm`` (the output
            projection's GEMM) instead, in the same launches: ``(q8, scales)``, float8_e4m3fn
            ``[B, Nq, H, e]`` and float32 ``[B, Nq, 1]`` (one scale per token across all heads),
            equal to ``quantize_fp8(linear_attention(...).view(B, Nq, H * e))`` (the contract in
            ``spar_kernels/_fp8_out.py``); ``out`` is then an optional pair of such contiguous
            buffers. On the GPU a program of the output launch owns 16 whole token rows and walks
            the heads (a token's scale spans them all).

    Returns:
        ``out``; d up to 128 (e is free: value columns are tiled). With ``fp8=True`` ``(q8, scales)``.
    """
    _check_inputs(q, k, v)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    B, Nq, H, _ = q.shape
    shape = (B, Nq, H, v.shape[3])
    fp8 = _fp8.check_flag(fp8)
    if fp8:
        q8, scales = _fp8.outputs(out, shape, q.device, scale_shape=(B, Nq, 1))
    elif out is None:
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    else:
        check_out("out", out, shape, q.dtype, q.device)
    # CPU tensors: the CPU implementations need none (a forced Triton run allocates its own)
    need = _workspace_numel(q, k, v, q.device.type != "cpu")
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    else:
        check_tensor("workspace", workspace, ndim=1, dtypes=(torch.float32,), device=q.device)
        if workspace.numel() < need or not workspace.is_contiguous():
            raise ValueError(f"workspace: expected a contiguous fp32 tensor of at least {need} elements "
                             f"(linear_attention_workspace(q, k, v)), got shape {tuple(workspace.shape)}, "
                             f"strides {workspace.stride()}")
    if fp8:
        if q8.numel():
            _linear_attention_fp8_op(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), float(eps), q8,
                                     scales, workspace)
        return q8, scales
    if out.numel():
        _linear_attention_op(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), float(eps), out,
                             workspace)
    return out
