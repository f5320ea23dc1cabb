"""hybrid_attention: spar vs PyTorch SDPA with a dense boolean mask vs (pure causal / full layouts)
SDPA without a mask, one call per sequence, vs FlexAttention (compiled, with a BlockMask; its
create_block_mask time is a separate row, timed only) vs flash-attn varlen (when importable,
causal-only and full-only layouts).

TFLOP/s count exactly the visible (query, key) pairs: 4 * pairs * head_dim * q_heads (QK^T and PV).
On CPU the figures are CPU figures (spar's CPU path: fp32 chunked matmul-softmax); GPU targets
(>= FlashAttention-2 on pure causal/full, >= 1.5x FlexAttention on hybrid layouts on an H100) can
only be measured on a GPU.
"""

from __future__ import annotations

import time

import torch

import spar_kernels as sk
from bench.harness import Case, Unavailable

# (q heads, kv heads, head dim)
QWEN_05B, QWEN_15B, QWEN_7B = (14, 2, 64), (12, 2, 128), (28, 4, 128)
SANA_06B_CROSS, SANA_16B_CROSS = (16, 16, 72), (20, 20, 112)

PROMPTS = (77, 12)   # CFG batch: the prompt and the (short) unconditional prompt
N_QUERIES = 256      # SPAR's learnable latent queries


def _layouts(quick: bool):
    """(label, layout builder args, heads, pure) with pure in {"causal", "full", None}."""
    spar = [[("causal", p + N_QUERIES)] for p in PROMPTS]
    conn = [[("full", p + N_QUERIES)] for p in PROMPTS]
    out = [
        ("SPAR prefill qwen2.5-0.5b 2x(prompt+256q)", ("segments", spar, None), QWEN_05B, "causal"),
        ("connector bidirectional qwen2.5-0.5b", ("segments", conn, None), QWEN_05B, "full"),
        ("DiT cross 2x256 img -> 300 ctx, d72", ("cross", [256, 256], [300, 300]), SANA_06B_CROSS, "full"),
        ("decode 2x1 query vs 8k cache qwen2.5-1.5b", ("segments", [[("causal", 8192)]] * 2, [1, 1]), QWEN_15B, "causal"),
    ]
    if quick:
        return out
    return out + [
        ("SPAR prefill qwen2.5-1.5b 2x(prompt+256q)", ("segments", spar, None), QWEN_15B, "causal"),
        ("DiT cross 2x1024 img -> 300 ctx, d112", ("cross", [1024, 1024], [300, 300]), SANA_16B_CROSS, "full"),
        ("BAGEL text+1024 img+text, 2 seqs", ("segments", [[("causal", 96), ("full", 1024), ("causal", 32)],
                                                           [("causal", 40), ("full", 1024), ("causal", 16)]], None),
         QWEN_7B, None),
        ("BAGEL text+4096 img+text", ("segments", [[("causal", 96), ("full", 4096), ("causal", 32)]], None), QWEN_7B,
         None),
        ("Show-o2 omni text/img/text x2", ("segments", [[("causal", 64), ("full", 729), ("causal", 48)]] * 2, None),
         QWEN_15B, None),
    ]


def _build(spec, device):
    if spec[0] == "cross":
        return sk.AttentionLayout.cross(spec[1], spec[2], device=device)
    return sk.AttentionLayout.from_segments(spec[1], num_queries=spec[2], device=device)


def _dense_mask(layout) -> torch.Tensor:
    """[total_q, total_k] block-diagonal boolean mask of the packed batch (what SDPA needs)."""
    cu_q, cu_k, st, en = layout.host_intervals()
    mask = torch.zeros(layout.total_q, layout.total_k, dtype=torch.bool)
    for b in range(layout.batch_size):
        j = torch.arange(int(cu_k[b + 1] - cu_k[b]))
        s = torch.from_numpy(st[cu_q[b]:cu_q[b + 1]]).unsqueeze(1)
        e = torch.from_numpy(en[cu_q[b]:cu_q[b + 1]]).unsqueeze(1)
        mask[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = (j >= s) & (j < e)
    return mask


def _flex_mask_mod(layout, device):
    cu_q, cu_k, st, en = (torch.from_numpy(a).to(device) for a in layout.host_intervals())
    seq_q = torch.repeat_interleave(torch.arange(layout.batch_size, device=device), cu_q.diff())
    seq_k = torch.repeat_interleave(torch.arange(layout.batch_size, device=device), cu_k.diff())
    k_off = cu_k[:-1]

    def mask_mod(b, h, q_idx, kv_idx):
        s = seq_q[q_idx]
        pos = kv_idx - k_off[s]
        return (seq_k[kv_idx] == s) & (pos >= st[q_idx]) & (pos < en[q_idx])
    return mask_mod


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for label, spec, (hq, hkv, d), pure in _layouts(quick):
        layout = _build(spec, device)
        flops = 4 * layout.visible_pairs * d * hq
        q = torch.randn(layout.total_q, hq, d, device=device, dtype=dtype)
        k = torch.randn(layout.total_k, hkv, d, device=device, dtype=dtype)
        v = torch.randn(layout.total_k, hkv, d, device=device, dtype=dtype)
        esize = q.element_size()
        moved = (q.numel() * 2 + k.numel() + v.numel()) * esize

        def spar(q=q, k=k, v=v, layout=layout):
            out = torch.empty_like(q)
            return lambda: sk.hybrid_attention(q, k, v, layout, out=out)

        def sdpa(q=q, k=k, v=v, layout=layout):
            if layout.total_q * layout.total_k > 64 * 1024 * 1024:
                raise Unavailable("dense mask over 64M entries")
            mask = _dense_mask(layout).to(device)
            qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                            enable_gqa=True)

        def sdpa_seq(q=q, k=k, v=v, layout=layout, pure=pure):
            # what eager code runs for a pure layout: one unmasked SDPA call per sequence (causal
            # where queries and keys are as many; a single query row sees every key)
            if pure is None:
                raise Unavailable("hybrid layout: SDPA takes it only as a mask")
            cu_q, cu_k, _, _ = layout.host_intervals()
            seqs = []
            for b in range(layout.batch_size):
                lq, lk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
                if pure == "causal" and lq not in (1, lk):
                    raise Unavailable("causal rows aligned to the end: SDPA's is_causal aligns to the start")
                seqs.append((*(t.transpose(0, 1).unsqueeze(0) for t in (q[cu_q[b]:cu_q[b + 1]],
                                                                          k[cu_k[b]:cu_k[b + 1]],
                                                                          v[cu_k[b]:cu_k[b + 1]])),
                             pure == "causal" and lq > 1))
            sdpa_fn = torch.nn.functional.scaled_dot_product_attention
            return lambda: [sdpa_fn(qt, kt, vt, is_causal=c, enable_gqa=True) for qt, kt, vt, c in seqs]

        def flex(q=q, k=k, v=v, layout=layout):
            if quick:
                raise Unavailable("skipped with --quick (torch.compile takes ~20 s per shape)")
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            bm = create_block_mask(_flex_mask_mod(layout, device), 1, 1, layout.total_q, layout.total_k,
                                   device=str(device))
            fn = torch.compile(flex_attention, dynamic=False)
            qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            return lambda: fn(qt, kt, vt, block_mask=bm, enable_gqa=True)

        def flex_mask(layout=layout):
            if quick:
                raise Unavailable("skipped with --quick")
            from torch.nn.attention.flex_attention import create_block_mask
            mm = _flex_mask_mod(layout, device)
            return lambda: create_block_mask(mm, 1, 1, layout.total_q, layout.total_k, device=str(device))

        def flash(q=q, k=k, v=v, layout=layout, pure=pure):
            if pure is None:
                raise Unavailable("flash-attn has no hybrid causal/full masks")
            if device.type != "cuda":
                raise Unavailable("flash-attn needs CUDA")
            try:
                from flash_attn import flash_attn_varlen_func
            except ImportError as e:
                raise Unavailable(f"flash_attn not importable ({e})") from e
            # flash-attn aligns causal masks to the bottom right: the same rows as num_queries layouts
            return lambda: flash_attn_varlen_func(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                                  layout.max_seqlen_q, layout.max_seqlen_k, causal=pure == "causal")

        yield Case(op="attention", name=f"{label} {str(dtype)[6:]}",
                   providers={"spar": spar, "sdpa dense mask": sdpa, "sdpa per sequence": sdpa_seq,
                              "flex (compiled)": flex, "flex create_block_mask": flex_mask,
                              "flash-attn varlen": flash},
                   bytes=moved, flops=flops, baseline="sdpa dense mask", setup=("flex create_block_mask",),
                   note=f"{layout.visible_pairs} visible pairs; Hq={hq} Hkv={hkv} D={d}")


if __name__ == "__main__":  # a quick look without the harness
    for c in cases(torch.device("cpu"), True):
        f = c.providers["spar"]()
        t = time.perf_counter()
        f()
        print(c.name, f"{(time.perf_counter() - t) * 1e3:.1f} ms")
