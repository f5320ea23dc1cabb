"""Image understanding (spar_runtime.internvl): vision encoding and `describe` vs transformers.

Providers, same weights, same run: ``spar`` (spar_runtime.MLLM) and ``transformers``
(InternVLForConditionalGeneration: ``get_image_features`` / ``generate`` with its KV cache).
The LLM prefill of the text-to-image path is benchmarked per stage in bench_pipeline.py.

Models (random weights, built in memory):
- quick: a tiny InternVL (ViT 32 wide, 2 layers, 56 px; LLM 64 wide, 2 layers);
- full: InternVL3-1B widths with FEWER LAYERS so that a CPU runs it in seconds: InternViT-300M
  (1024 wide, 16 heads, MLP 4096, 448 px -> 1025 tokens) with 4 of 24 layers, Qwen2.5-0.5B (896
  wide, 14/2 heads, FFN 4864) with 4 of 24 layers, vocabulary 32000.
Cases: ``encode_images`` of one image; ``describe``: one image (256 image tokens at 448 px) + 24
text tokens, 16 greedy tokens (prefill + 15 decode steps).
"""

from __future__ import annotations

import functools

import torch

from bench.harness import Case, Unavailable

NEW_TOKENS = 16
IMAGE_TOKEN = 5


def _vit_flops(C: int, I: int, T: int, L: int) -> int:
    """Matmul FLOPs of L InternViT layers on T tokens: q/k/v/o projections, MLP, attention."""
    return L * (2 * T * (4 * C * C + 2 * C * I) + 4 * T * T * C)


@functools.lru_cache(maxsize=2)
def _models(quick: bool, device_type: str, dtype: torch.dtype):
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise Unavailable(f"transformers: {e}") from e
    from spar_runtime.internvl import MLLM

    if quick:
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=128)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=56, patch_size=14, attention_bias=True)
    else:
        text = dict(hidden_size=896, num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=32000, tie_word_embeddings=True)
        vision = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096,
                      image_size=448, patch_size=14, attention_bias=True)
    grid = vision["image_size"] // vision["patch_size"]
    cfg = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**vision), text_config=transformers.Qwen2Config(**text),
        image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, image_seq_length=(grid // 2) ** 2,
        tie_word_embeddings=text.get("tie_word_embeddings", False))
    torch.manual_seed(0)
    device = torch.device(device_type)
    ref = transformers.InternVLForConditionalGeneration(cfg).eval().to(device, dtype)
    # the checkpoint's names, as save_pretrained writes them
    sd = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("model."):
            k = k[len("model."):]
        sd[k] = v
    mllm = MLLM(cfg.to_dict(), sd)
    return ref, mllm, cfg


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size, C, I, L, T = (56, 32, 64, 2, 17) if quick else (448, 1024, 4096, 4, 1025)
    tag = "tiny InternVL" if quick else "InternVL3-1B widths, ViT 4/24 + LLM 4/24 layers"

    def inputs():
        ref, mllm, cfg = _models(quick, device.type, dtype)
        g = torch.Generator().manual_seed(1)
        pv = torch.randn(1, 3, size, size, generator=g).to(device, dtype)
        V = cfg.text_config.vocab_size
        text = lambda n: torch.randint(8, V, (n,), generator=g)  # noqa: E731
        # host ids: spar's describe checks them and finds the image rows on the host (what a tokenizer
        # gives it); transformers' generate takes them on the device
        ids = torch.cat([text(8), torch.full((cfg.image_seq_length,), IMAGE_TOKEN), text(16)])
        return ref, mllm, pv, ids

    def spar_encode():
        _, mllm, pv, _ = inputs()
        return lambda: mllm.encode_images(pv)

    def hf_encode():
        ref, _, pv, _ = inputs()

        def run():
            with torch.inference_mode():
                return ref.model.get_image_features(pixel_values=pv).pooler_output
        return run

    def spar_describe():
        _, mllm, pv, ids = inputs()
        return lambda: mllm.describe(pv, ids, NEW_TOKENS, eos_token_id=[])

    def hf_describe():
        ref, _, pv, ids = inputs()
        ids = ids[None].to(device)

        def run():
            with torch.inference_mode():
                return ref.generate(input_ids=ids, pixel_values=pv, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return run

    dt = str(dtype)[6:]
    yield Case(op="runtime_llm", name=f"encode_images 1x{size}px {tag} {dt}",
               providers={"spar": spar_encode, "transformers": hf_encode},
               flops=_vit_flops(C, I, T, L), baseline="transformers")
    yield Case(op="runtime_llm", name=f"describe {NEW_TOKENS} greedy tokens, 1 image, {tag} {dt}",
               providers={"spar": spar_describe, "transformers": hf_describe}, baseline="transformers",
               note="prefill (image + 24 text tokens) + 15 decode steps with a KV cache")
