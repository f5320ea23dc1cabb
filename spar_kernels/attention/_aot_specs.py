"""AOT specs of the hybrid_attention kernels (``python -m spar_kernels.inspect --kernel hybrid_attention``).

The specs are not written by hand: :class:`~spar_kernels.attention.kernels.Plan` builds the launches
for meta tensors at the shapes spar's models run, and :func:`spar_kernels._aot.launch_spec` turns
each launch's arguments into the signature triton's JIT would compile on a GPU (integers equal to 1
as constants, multiples of 16 and 16-byte aligned pointers as divisible, integers >= 2**31 as i64),
except for the arguments the kernels exclude from specialization (``kernels.NO_SPECIALIZE``).
Identical compilations are listed once.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _aot
from . import kernels as ak

# (label, q heads, kv heads, head dim): the models' attention shapes
_PREFILL_HEADS = (
    ("qwen2.5-0.5b", 14, 2, 64),
    ("qwen2.5-1.5b", 12, 2, 128),
    ("tokenizer spar-1b", 16, 16, 56),   # head dim a multiple of 8, not 16 (ALIGN 8), BLOCK_D 64
    ("sana cross", 16, 16, 72),          # the same with BLOCK_D 128
)
_DECODE_HEADS = _PREFILL_HEADS[:2]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _case(dtype, hq, hkv, d, seqlens_q, seqlens_k, *, fused=False, head_major_rows=0):
    """The launches of one call: ``fused`` takes q/k/v as views of one packed projection,
    ``head_major_rows`` makes q, k and v head-major views ``[heads, rows, d].transpose(0, 1)`` of
    that many rows (2**28 rows: head strides of 2**31 units of ALIGN, 64-bit stride arguments)."""
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)
    if fused:
        assert total_q == total_k
        qkv = _meta(total_q, hq + 2 * hkv, d, dtype=dtype)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    elif head_major_rows:
        q = _meta(hq, head_major_rows, d, dtype=dtype).transpose(0, 1)[:total_q]
        k = _meta(hkv, head_major_rows, d, dtype=dtype).transpose(0, 1)[:total_k]
        v = _meta(hkv, head_major_rows, d, dtype=dtype).transpose(0, 1)[:total_k]
    else:
        q, k, v = _meta(total_q, hq, d, dtype=dtype), _meta(total_k, hkv, d, dtype=dtype), _meta(total_k, hkv, d,
                                                                                                  dtype=dtype)
    fp8 = dtype == torch.float8_e4m3fn
    out = _meta(total_q, hq, d, dtype=torch.bfloat16 if fp8 else dtype)
    B = len(seqlens_q)
    cu_q, cu_k = _meta(B + 1, dtype=torch.int32), _meta(B + 1, dtype=torch.int32)
    st, en = _meta(total_q, dtype=torch.int32), _meta(total_q, dtype=torch.int32)
    plan = ak.plan_for(q, k, B, max(seqlens_q), max(seqlens_k), v=v, out=out)
    scratch = plan.carve(_meta(plan.numel), "meta")
    lse = _meta(hq, total_q)
    qd, kd, vd = (_meta(hq), _meta(hkv), _meta(hkv)) if fp8 else (lse, lse, lse)
    if fp8:
        q, k, v = q.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    return plan, plan.launches(q, k, v, cu_q, cu_k, st, en, 0.125, out, lse, qd, kd, vd, scratch)


def _cases():
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32):
        for label, hq, hkv, d in _PREFILL_HEADS:
            yield f"prefill {label}", _case(dtype, hq, hkv, d, [333, 77], [333, 77])
        if dtype != torch.float32:
            for label, hq, hkv, d in _DECODE_HEADS:
                yield f"decode {label}", _case(dtype, hq, hkv, d, [1], [8192])
    bf16 = torch.bfloat16
    yield "prefill tokenizer, fused qkv", _case(bf16, 16, 16, 56, [256] * 4, [256] * 4, fused=True)
    yield "prefill ragged 3 heads x 40, fused qkv", _case(bf16, 3, 1, 40, [37, 5], [37, 5], fused=True)
    yield "prefill ragged 3 heads x 12 (ALIGN 1)", _case(bf16, 3, 1, 12, [37, 5], [37, 5])
    yield "prefill head-major > 2^31 elements", _case(bf16, 8, 8, 128, [300], [300], head_major_rows=1 << 28)
    yield "decode head-major > 2^31 elements", _case(bf16, 8, 2, 128, [1], [8192], head_major_rows=1 << 28)


_KIND = {"_hybrid_attn_fwd": "fwd", "_hybrid_attn_decode": "decode", "_combine_kernel": "combine"}


def _unspecialize(spec: _aot.AOTSpec, args: dict, names) -> _aot.AOTSpec:
    """Undo launch_spec's run-time specialization of ``names`` (the kernel's do_not_specialize)."""
    types, consts = dict(spec.types), dict(spec.constexprs)
    for n in names:
        if n in args:
            consts.pop(n, None)
            types[n] = "i32" if -2**31 <= args[n] < 2**31 else "i64"
    aligned = tuple(a for a in spec.aligned if a not in names)
    return dataclasses.replace(spec, types=types, constexprs=consts, aligned=aligned)


@_aot.register
def aot_specs():
    specs = []
    for label, (plan, launches) in _cases():
        for fn, _grid, args, consts, warps, stages in launches:
            name = getattr(fn, "__name__", None) or fn.fn.__name__
            kind = _KIND[name]
            consts = dict(consts, DOT_UPCAST=False) if "DOT_UPCAST" in consts else consts
            t = str(args["Q"].dtype if kind != "combine" else args["O"].dtype).replace("torch.", "")
            tiles = f"{consts.get('BLOCK_M', '-')}x{consts.get('BLOCK_N', '-')}" if kind != "combine" else \
                f"splits<={consts['BLOCK_S']}"
            cfg = f"{kind} {t} BLOCK_D={consts['BLOCK_D']} {tiles} warps={warps} stages={stages} [{label}]"
            spec = _aot.launch_spec("hybrid_attention", fn, cfg, args, consts, num_warps=warps, num_stages=stages,
                                    expect_mma=kind != "combine" and t != "float32")
            specs.append(_unspecialize(spec, args, ak.NO_SPECIALIZE[kind]))
    return _aot.unique(specs)
