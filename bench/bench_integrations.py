"""spar_runtime.integrations: stock transformers/diffusers models vs the same models after ``patch``.

Providers, same weights, same inputs, same run: ``patched`` (``spar_runtime.integrations.patch``
applied, and ``FlowStepScheduler`` for the pipeline) and ``stock`` (the baseline: the model as
transformers / diffusers ship it, SDPA attention). Models are random, built in memory:

- ``qwen2 prefill``: ``Qwen2Model`` at SPAR-1B's LLM widths (Qwen2.5-0.5B: 896 wide, 14/2 heads,
  FFN 4864) with 4 of its 24 layers (quick: 2 layers, 64 wide), a right-padded batch of 4
  prompts (128, 97, 64 and 33 tokens; quick: 17, 12, 9, 5), without a cache (``use_cache=False``:
  the patched model drops the padding, 322 of 512 rows remain);
- ``sana dit``: one ``SanaTransformer2DModel`` forward at SANA-0.6B widths (1152 wide, 36 x 32
  self-attention heads, 16 x 72 cross heads) with 4 of its 28 layers, the CFG batch of 2, a 16 x 16
  latent (512 px) and SPAR's context: 256 latent-query tokens (quick: the tiny config). Two rows:
  the same context tensor at every call, as a denoising loop passes it (the patched model keeps
  the context's projection and K/V from the previous call), and a new context tensor at every call
  (nothing kept: the per-call cost of a one-off forward);
- ``sana pipeline``: ``SanaPipeline`` end to end (``prompt_embeds`` given, CFG 4.5, DPM-Solver++
  flow scheduler, DC-AE decode), tiny components (SPAR's ``tiny`` config: 32 px, 4 steps) and, in
  the full run, SPAR-1B widths with fewer layers (DiT 2 of 28 layers, DC-AE f32c32 decoder with one
  layer per stage, 512 px, 2 steps).

fp32 on CPU (bf16 on CUDA). FLOPs are counted for the transformer cases (matmuls only).
"""

from __future__ import annotations

import copy
import functools

import torch

from bench.harness import Case, Unavailable

PROMPTS = {True: (17, 12, 9, 5), False: (128, 97, 64, 33)}


def _imports():
    try:
        import diffusers
        import transformers
    except ImportError as e:  # pragma: no cover
        raise Unavailable(f"transformers/diffusers: {e}") from e
    from spar_runtime import integrations
    return transformers, diffusers, integrations


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _pair(stock: torch.nn.Module, device, dtype):
    """(stock, patched copy) on ``device`` in ``dtype``, both in eval mode without gradients."""
    _, _, integ = _imports()
    stock = stock.eval().requires_grad_(False).to(device, dtype)
    return stock, integ.patch(copy.deepcopy(stock))


# ---------------------------------------------------------------------------------------------
# Qwen2 prefill

@functools.lru_cache(maxsize=1)
def _qwen(quick: bool, device_type: str, dtype: torch.dtype):
    transformers, _, _ = _imports()
    from spar_runtime.configs import SPAR_1B, TINY

    text = dict((TINY if quick else SPAR_1B).text_config)
    text.update(num_hidden_layers=2 if quick else 4, vocab_size=min(text["vocab_size"], 32000))
    cfg = transformers.Qwen2Config(**_clean(text))
    torch.manual_seed(0)
    return _pair(transformers.Qwen2Model(cfg), torch.device(device_type), dtype) + (cfg,)


def _qwen_case(device, quick, dtype):
    lens = PROMPTS[quick]

    def provider(which):
        def factory():
            stock, patched, cfg = _qwen(quick, device.type, dtype)
            model = patched if which == "patched" else stock
            T = max(lens)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(8, cfg.vocab_size, (len(lens), T), generator=g).to(device)
            mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).long().to(device)

            def run():
                with torch.inference_mode():
                    return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return run
        return factory

    D, F, L = 64 if quick else 896, 96 if quick else 4864, 2 if quick else 4
    heads, kv, hd = (4, 2, 16) if quick else (14, 2, 64)
    T, B = max(lens), len(lens)
    flops = L * (2 * B * T * (D * (heads + 2 * kv) * hd + heads * hd * D + 3 * D * F) + 4 * B * heads * T * T * hd)
    tag = "tiny" if quick else "SPAR-1B LLM widths, 4/24 layers"
    yield Case(op="integrations", name=f"qwen2 prefill, padded batch {list(lens)}, {tag} {str(dtype)[6:]}",
               providers={"patched": provider("patched"), "stock": provider("stock")}, baseline="stock",
               flops=flops, note="Qwen2Model forward, 4 right-padded prompts, attention_mask given")


# ---------------------------------------------------------------------------------------------
# SANA DiT forward

@functools.lru_cache(maxsize=1)
def _dit(quick: bool, device_type: str, dtype: torch.dtype):
    _, diffusers, _ = _imports()
    from spar_runtime.configs import SPAR_1B, TINY

    cfg = _clean((TINY if quick else SPAR_1B).dit_config)
    if not quick:
        cfg["num_layers"] = 4
    torch.manual_seed(0)
    return _pair(diffusers.SanaTransformer2DModel(**cfg), torch.device(device_type), dtype) + (cfg,)


def _dit_case(device, quick, dtype):
    from spar_runtime.configs import SPAR_1B, TINY

    spar = TINY if quick else SPAR_1B
    B, ctx, hw = 2, spar.num_queries, spar.latent_size

    def provider(which, fresh_context):
        def factory():
            stock, patched, cfg = _dit(quick, device.type, dtype)
            model = patched if which == "patched" else stock
            g = torch.Generator().manual_seed(2)
            x = torch.randn(B, cfg["in_channels"], hw, hw, generator=g).to(device, dtype)
            e = torch.randn(B, ctx, cfg["caption_channels"], generator=g).to(device, dtype)
            mask = torch.ones(B, ctx, dtype=torch.long, device=device)
            t = torch.tensor([700.0, 700.0], device=device)

            def run():
                with torch.inference_mode():
                    # a new context tensor per call: nothing of the previous call can be reused
                    ehs = e.clone() if fresh_context else e
                    return model(x, ehs, t, encoder_attention_mask=mask).sample
            return run
        return factory

    c = _clean(spar.dit_config)
    D, L, N = c["num_attention_heads"] * c["attention_head_dim"], 2 if quick else 4, hw * hw
    Dc = c["num_cross_attention_heads"] * c["cross_attention_head_dim"]
    Fh = int(c.get("mlp_ratio", 2.5) * D)
    per_token = 2 * (4 * D * D + D * Dc + Dc * D + 2 * Fh * D + Fh * D) + 4 * D * c["attention_head_dim"]
    flops = B * L * (N * per_token + 2 * N * ctx * 2 * Dc + ctx * 2 * 2 * D * Dc)
    tag = "tiny" if quick else "SANA-0.6B widths, 4/28 layers"
    for fresh in (False, True):
        what = "a new context each call" if fresh else "a denoising step (same context tensor as the last call)"
        yield Case(op="integrations", name=f"sana dit forward, {what}, batch {B}, {N} latent + {ctx} context tokens, "
                                           f"{tag} {str(dtype)[6:]}",
                   providers={"patched": provider("patched", fresh), "stock": provider("stock", fresh)},
                   baseline="stock", flops=flops, note="SanaTransformer2DModel forward with encoder_attention_mask")


# ---------------------------------------------------------------------------------------------
# SanaPipeline end to end

@functools.lru_cache(maxsize=1)
def _pipes(which: str, device_type: str, dtype: torch.dtype):
    _, diffusers, integ = _imports()
    from spar_runtime.configs import SPAR_1B, TINY

    spar = TINY if which == "tiny" else SPAR_1B
    dit_cfg, vae_cfg = _clean(spar.dit_config), _clean(spar.vae_config)
    if which != "tiny":
        dit_cfg["num_layers"] = 2
        vae_cfg["decoder_layers_per_block"] = [min(n, 1) for n in vae_cfg["decoder_layers_per_block"]]
        vae_cfg["encoder_layers_per_block"] = [min(n, 1) for n in vae_cfg["encoder_layers_per_block"]]
    device = torch.device(device_type)
    torch.manual_seed(0)
    dit = diffusers.SanaTransformer2DModel(**dit_cfg).eval().requires_grad_(False).to(device, dtype)
    vae = diffusers.AutoencoderDC(**vae_cfg).eval().requires_grad_(False).to(device, dtype)
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=spar.flow_shift,
                                                  prediction_type="flow_prediction")
    stock = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit, scheduler=sched)
    patched = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=copy.deepcopy(vae),
                                     transformer=copy.deepcopy(dit),
                                     scheduler=integ.FlowStepScheduler.from_scheduler(sched))
    integ.patch(patched)
    for p in (stock, patched):
        p.set_progress_bar_config(disable=True)
    return stock, patched, spar, dit_cfg


def _pipeline_case(device, which, dtype):
    def provider(kind):
        def factory():
            stock, patched, spar, cfg = _pipes(which, device.type, dtype)
            pipe = patched if kind == "patched" else stock
            g = torch.Generator().manual_seed(3)
            L, C = spar.num_queries, cfg["caption_channels"]
            emb = torch.randn(1, L, C, generator=g).to(device, dtype)
            neg = torch.randn(1, L, C, generator=g).to(device, dtype)
            ones = torch.ones(1, L, dtype=torch.long, device=device)
            px = spar.image_size
            steps = spar.num_steps if which == "tiny" else 2

            def run():
                with torch.inference_mode():
                    return pipe(prompt_embeds=emb, prompt_attention_mask=ones, negative_prompt=None,
                                negative_prompt_embeds=neg, negative_prompt_attention_mask=ones, height=px,
                                width=px, num_inference_steps=steps, guidance_scale=spar.guidance,
                                output_type="pt", use_resolution_binning=False,
                                generator=torch.Generator().manual_seed(0)).images
            return run
        return factory

    tag = "tiny components" if which == "tiny" else "SPAR-1B widths (DiT 2/28 layers, DC-AE 1 layer/stage)"
    yield Case(op="integrations", name=f"SanaPipeline end to end, {tag} {str(dtype)[6:]}",
               providers={"patched": provider("patched"), "stock": provider("stock")}, baseline="stock",
               note="prompt_embeds given, CFG, DPM-Solver++ flow scheduler (FlowStepScheduler when patched)")


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    yield from _qwen_case(device, quick, dtype)
    yield from _dit_case(device, quick, dtype)
    yield from _pipeline_case(device, "tiny", dtype)
    if not quick:
        yield from _pipeline_case(device, "spar-1b", dtype)


def interleaved(quick: bool = False, reps: int = 5, match: str = "") -> None:
    """Every case with patched and stock calls alternating (after one warm-up call each), so that
    load changes on a shared machine hit both alike (on CPU: each sample a block of calls of about
    0.2 s of this process's CPU time, the order rotating); prints medians and p20-p80 per provider
    and stock / patched. ``python -m bench.bench_integrations [--quick] [--reps N] [--match TEXT]`` (only
    the cases whose name contains TEXT)."""
    from bench.harness import device_name, time_interleaved

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{device_name(device)}, {'quick' if quick else 'full'} cases, {reps} interleaved reps; "
          f"{'CUDA figures, wall' if device.type == 'cuda' else 'CPU figures, process CPU'} time per call in ms")
    print("| case | patched ms (p20-p80) | stock ms (p20-p80) | stock / patched |\n|---|---:|---:|---:|")
    for case in cases(device, quick):
        if match not in case.name:
            continue
        fns = {k: case.providers[k]() for k in ("patched", "stock")}
        if device.type == "cuda":
            t = time_interleaved(fns, reps, warmup=1, clock="wall", sync=torch.cuda.synchronize)
        else:   # this process's CPU time (robust on a shared machine), blocks of calls of ~0.2 s
            t = time_interleaved(fns, reps, warmup=1, clock="cpu", rotate=True, budget_s=0.2)
        med, p20, p80 = ({k: v * 1e3 for k, v in d.items()} for d in (t.median(), t.quantile(0.2), t.quantile(0.8)))
        cells = [f"{med[k]:.1f} ({p20[k]:.1f}-{p80[k]:.1f})" for k in fns]
        print(f"| {case.name} | {cells[0]} | {cells[1]} | {med['stock'] / med['patched']:.3f}x |", flush=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.bench_integrations")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--match", default="", help="only the cases whose name contains this text")
    a = p.parse_args()
    torch.set_num_threads(1)
    interleaved(a.quick, a.reps, a.match)
