"""Plain-PyTorch reference of one fused flow-sampler step (:class:`spar_kernels.FlowSampler`).

Everything is computed in float32 from the inputs as stored; the state is viewed as
``[B, P, Q]`` (see ``spar_kernels.flow_sampler``). One step, at evaluation ``k`` of the schedule:

    guidance (BAGEL's two-branch form; plain CFG when there is no image branch)
        v_txt = v_uncond + g * (v_cond - v_uncond)
        v_g   = v_img_uncond + g_img * (v_txt - v_img_uncond)      if the image branch is on
        v_g  *= clamp(|v_cond| / (|v_g| + 1e-8), renorm_min, 1)     if renorm is on
        v     = v_g if guidance is on at this step else v_cond
    solver (coefficients from the step's table row)
        x0    = x - sigma * v
        out   = cx * x + cv * v + c0 * x0 + c1 * h1 + c2 * h2
        h1   <- x or x0 (when the row says so), h2 <- v (when the row says so)

The norms are taken over the whole sample (``"global"``), along Q per (b, p) (``"row"``) or
along P per (b, q) (``"col"``). The table row is picked with the device-side counter (no host
sync), so the reference is also capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

# The coefficient table's layout is the sampler's (spar_kernels.flow_sampler, shared with
# csrc/flow_sampler/flow_sampler.h); the reference reads it by the same names.
from ..flow_sampler import (COL_C0, COL_C1, COL_C2, COL_CV, COL_CX, COL_FLAGS, COL_G, COL_GI,  # noqa: E402,F401
                            COL_SIGMA, F_CFG, F_IMG, F_READ_H1, F_READ_H2, F_RENORM, F_RENORM_TEXT,
                            F_STORE_H1_X, F_STORE_H1_X0, F_STORE_H2_V, NCOL, RENORM_COL, RENORM_GLOBAL,
                            RENORM_NONE, RENORM_ROW)
RENORM_EPS = 1e-8  # BAGEL: norm_v_t / (norm_v_t_ + 1e-8)


def _norm(t: torch.Tensor, mode: int) -> torch.Tensor:
    if mode == RENORM_GLOBAL:
        return t.square().sum(dim=(1, 2), keepdim=True).sqrt()
    if mode == RENORM_ROW:
        return t.square().sum(dim=2, keepdim=True).sqrt()
    return t.square().sum(dim=1, keepdim=True).sqrt()


def _renormed(vc, v, on, renorm_mode, renorm_min):
    if renorm_mode == RENORM_NONE:
        return v
    s = (_norm(vc, renorm_mode) / (_norm(v, renorm_mode) + RENORM_EPS)).clamp(min=renorm_min, max=1.0)
    return torch.where(on, v * s, v)


def guided_velocity(vc, vu, vi, g, gi, cfg_on, img_on, renorm_on, renorm_mode: int, renorm_min: float,
                    text_on=None):
    """The combined velocity in float32. ``g, gi`` are float32 tensors (broadcastable), the ``*_on``
    flags bool tensors; ``vu``/``vi`` may be None when the corresponding flag is never on.
    ``text_on``: renorm the text-guided velocity before the image branch (BAGEL's "text_channel")."""
    vc = vc.float()
    if vu is None:
        return vc
    vt = vu.float() + g * (vc - vu.float())
    img = (lambda t: torch.where(img_on, vi.float() + gi * (t - vi.float()), t)) if vi is not None else (lambda t: t)
    v = _renormed(vc, img(vt), renorm_on, renorm_mode, renorm_min)  # renorm after the image branch
    if text_on is not None:
        v_text = img(_renormed(vc, vt, renorm_on, renorm_mode, renorm_min))
        v = torch.where(text_on, v_text, v)
    return torch.where(cfg_on, v, vc)


def flow_step(x, v_cond, v_uncond, v_img_uncond, out, h1, h2, table, counter, renorm_mode: int,
              renorm_min: float) -> None:
    """One step on ``[B, P, Q]`` views: writes ``out`` (x's dtype) and the fp32 history ``h1``/``h2``,
    then advances ``counter[0]`` (int32). Rows past the end of the table are the identity."""
    rows = table.shape[0]
    counter = counter[:1]  # counter[1] is the CUDA kernel's block-done count
    k = counter.long().clamp(max=rows - 1)
    row = table.index_select(0, k)[0]  # device-side lookup
    flags = row[COL_FLAGS].to(torch.int32)

    def on(bit):
        return (flags & bit) != 0

    v = guided_velocity(v_cond, v_uncond, v_img_uncond, row[COL_G], row[COL_GI], on(F_CFG), on(F_IMG),
                        on(F_RENORM), renorm_mode, renorm_min, on(F_RENORM_TEXT))
    xf = x.float()
    x0 = xf - row[COL_SIGMA] * v
    res = row[COL_CX] * xf + row[COL_CV] * v
    res = res + torch.where(row[COL_C0] != 0, row[COL_C0] * x0, torch.zeros_like(x0))  # 0 * x0: NaN for v = inf
    if h1 is not None:
        res = res + torch.where(on(F_READ_H1), row[COL_C1] * h1, torch.zeros_like(h1))
        h1.copy_(torch.where(on(F_STORE_H1_X), xf, torch.where(on(F_STORE_H1_X0), x0, h1)))
    if h2 is not None:
        res = res + torch.where(on(F_READ_H2), row[COL_C2] * h2, torch.zeros_like(h2))
        h2.copy_(torch.where(on(F_STORE_H2_V), v, h2))
    out.copy_(res)
    counter.add_(1)
