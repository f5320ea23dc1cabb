"""SPAR model configurations: SPAR-1B, SPAR-3B and a `tiny` one for tests and demos.

A :class:`SparConfig` holds the fields of a checkpoint's ``spar_config.json`` plus the configs of
its three components in their public formats, exactly as their ``config.json`` files hold them:

- ``mllm_config``: a transformers InternVL config (``InternVLForConditionalGeneration``, the format
  of the public "-hf" InternVL3 checkpoints) or a text-only Qwen2 config (``Qwen2ForCausalLM``);
- ``dit_config``: a diffusers ``SanaTransformer2DModel`` config;
- ``vae_config``: a diffusers ``AutoencoderDC`` config.

Sizes come from the public configs of the components (../shared/SPAR_MODEL.md): InternVL3-1B
(InternViT-300M + Qwen2.5-0.5B) / InternVL3-2B (InternViT-300M + Qwen2.5-1.5B), SANA-0.6B /
SANA-1.6B at 512 px (16x16 latents), DC-AE f32c32 (SANA 1.0). No official SPAR weights are public:
the SPAR-specific fields (256 queries, DTR layers, 6 connector layers, flow shift 3.0, 20 steps,
guidance 4.5, the dual-stream image tokenizer: 6 pixel layers of 16 heads, 3 MLP blocks per stream)
follow the paper as summarized in SPAR_MODEL.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from typing import Any, Mapping

import numpy as np

from spar_kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM   # the head dims hybrid_attention takes

__all__ = ["SparConfig", "TokenizerConfig", "CONFIGS", "get_config", "SPAR_1B", "SPAR_3B", "TINY"]

# Keys of spar_config.json (the component configs live in the component folders).
SPAR_JSON_KEYS = ("num_queries", "dtr_layers", "dtr_tau", "dtr_norm_eps", "connector_layers", "latent_channels",
                  "latent_size", "vae_scale_factor", "flow_shift", "num_steps", "guidance", "mllm", "dit", "vae")
OPTIONAL_JSON_KEYS = ("tokenizer",)   # the image tokenizer (spar_runtime.image_tokenizer); absent: none
DEFAULT_TOKENIZER = {"pixel_layers": 6, "pixel_heads": 16, "mlp_blocks": 3}


def _qwen2(hidden, layers, heads, kv_heads, ffn, *, vocab=151674, tie=False, theta=1_000_000.0, eps=1e-6,
           max_pos=32768, **extra) -> dict:
    """A Qwen2 text config in the format of a public Qwen2.5 ``config.json``."""
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
         "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
         "head_dim": hidden // heads, "intermediate_size": ffn, "hidden_act": "silu", "rms_norm_eps": eps,
         "rope_theta": theta, "vocab_size": vocab, "max_position_embeddings": max_pos,
         "tie_word_embeddings": tie, "attention_dropout": 0.0, "use_sliding_window": False}
    d.update(extra)
    return d


def _internvit(hidden=1024, layers=24, heads=16, ffn=4096, image=448, patch=14) -> dict:
    """An InternVL vision config (InternViT-300M by default) as transformers' InternVLVisionConfig."""
    return {"model_type": "internvl_vision", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ffn, "hidden_act": "gelu",
            "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "image_size": [image, image],
            "patch_size": [patch, patch], "num_channels": 3, "attention_bias": True, "use_qk_norm": False,
            "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
            "use_mask_token": False}


def _internvl(vision: dict, text: dict, *, image_token_id=151667, downsample_ratio=0.5) -> dict:
    grid = vision["image_size"][0] // vision["patch_size"][0]
    tokens = int(grid * downsample_ratio) ** 2
    return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "vision_config": vision, "text_config": text, "image_token_id": image_token_id,
            "image_seq_length": tokens, "downsample_ratio": downsample_ratio, "projector_hidden_act": "gelu",
            "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": text.get("tie_word_embeddings", False)}


def _sana(heads, head_dim, layers, cross_heads, cross_head_dim, *, caption_channels=2304, in_channels=32,
          sample_size=16) -> dict:
    """A diffusers SanaTransformer2DModel config."""
    return {"_class_name": "SanaTransformer2DModel", "in_channels": in_channels, "out_channels": in_channels,
            "num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": layers,
            "num_cross_attention_heads": cross_heads, "cross_attention_head_dim": cross_head_dim,
            "cross_attention_dim": cross_heads * cross_head_dim, "caption_channels": caption_channels,
            "mlp_ratio": 2.5, "dropout": 0.0, "attention_bias": False, "sample_size": sample_size,
            "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None,
            "guidance_embeds": False, "qk_norm": None, "timestep_scale": 1.0}


def _dcae_f32c32() -> dict:
    """dc-ae-f32c32-sana-1.0 as diffusers' AutoencoderDC config (diffusers' DC-AE conversion script)."""
    blocks = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    return {"_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
            "encoder_block_types": blocks, "decoder_block_types": blocks,
            "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
            "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
            "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
            "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
            "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
            "upsample_block_type": "interpolate", "downsample_block_type": "conv",
            "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "encoder_out_shortcut": True,
            "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 0.41407}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``spar_config.json``'s ``"tokenizer"`` object."""

    pixel_layers: int = 6
    pixel_heads: int = 16
    mlp_blocks: int = 3

    @classmethod
    def from_dict(cls, d, where: str = "tokenizer") -> "TokenizerConfig":
        """Validate a ``"tokenizer"`` object (missing fields take the defaults above)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected an object like {dataclasses.asdict(cls())}, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(names)}")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {k} = {v!r}, expected an int >= 1")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_width(self, hidden_size: int, where: str = "tokenizer") -> int:
        """The pixel stream's head dim for width ``hidden_size`` (ValueError if it does not fit)."""
        if hidden_size % self.pixel_heads:
            raise ValueError(f"{where}: pixel_heads = {self.pixel_heads} must divide the LLM width {hidden_size}")
        d = hidden_size // self.pixel_heads
        if d > MAX_HEAD_DIM:
            raise ValueError(f"{where}: head dim {hidden_size} / {self.pixel_heads} = {d} is larger than "
                             f"hybrid_attention takes ({MAX_HEAD_DIM}); use more pixel_heads")
        if d < MIN_HEAD_DIM:
            raise ValueError(f"{where}: head dim {hidden_size} / {self.pixel_heads} = {d} is smaller than "
                             f"hybrid_attention takes ({MIN_HEAD_DIM}); use fewer pixel_heads")
        return d


def _evenly_spaced(num_layers: int, k: int = 4) -> tuple[int, ...]:
    """K hidden-state indices evenly spaced up to the final normed output (index L)."""
    return tuple(num_layers * (i + 1) // k for i in range(k))


@dataclasses.dataclass(frozen=True)
class SparConfig:
    """Everything needed to build a SPAR pipeline (see the module docstring)."""

    name: str
    num_queries: int
    dtr_layers: tuple[int, ...]
    dtr_tau: float
    dtr_norm_eps: float
    connector_layers: int
    latent_channels: int
    latent_size: int
    vae_scale_factor: float
    flow_shift: float
    num_steps: int
    guidance: float
    mllm_config: dict
    dit_config: dict
    vae_config: dict
    mllm: str = "mllm"   # component folder names, as spar_config.json names them
    dit: str = "dit"
    vae: str = "vae"
    tokenizer: dict | None = None   # the image tokenizer's {"pixel_layers", "pixel_heads", "mlp_blocks"}

    def __post_init__(self):
        self._validate_types()
        object.__setattr__(self, "dtr_layers", tuple(int(i) for i in self.dtr_layers))
        self.validate()

    _INT_FIELDS = ("num_queries", "connector_layers", "latent_channels", "latent_size", "num_steps")
    _FLOAT_FIELDS = ("dtr_tau", "dtr_norm_eps", "vae_scale_factor", "flow_shift", "guidance")

    def _validate_types(self) -> None:
        """Each field's type, before anything converts it (a float num_queries, a string
        dtr_layers read as its digits, an infinite scale): ValueError naming the field."""
        def bad(field, got, expected):
            raise ValueError(f"SparConfig {self.name!r}: {field} = {got!r}, expected {expected}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for f in self._INT_FIELDS:
            if not is_int(getattr(self, f)):
                bad(f, getattr(self, f), "an int")
        for f in self._FLOAT_FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                bad(f, v, "a finite number")
        if not isinstance(self.dtr_layers, (list, tuple)) or not all(is_int(i) for i in self.dtr_layers):
            bad("dtr_layers", self.dtr_layers, "a list of ints")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def is_internvl(self) -> bool:
        return "text_config" in self.mllm_config

    @property
    def text_config(self) -> dict:
        """The Qwen2 text config of the LLM (also the connector's config)."""
        return self.mllm_config["text_config"] if self.is_internvl else self.mllm_config

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def num_llm_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def caption_channels(self) -> int:
        return int(self.dit_config["caption_channels"])

    @property
    def image_token_grid(self) -> tuple[int, int] | None:
        """Rows and columns of image tokens one image gives the LLM (InternVL: the patch grid
        times ``downsample_ratio``); None for a text-only MLLM."""
        if not self.is_internvl:
            return None
        v = self.mllm_config["vision_config"]
        size, patch = v["image_size"], v["patch_size"]
        size = (size, size) if isinstance(size, int) else size
        patch = (patch, patch) if isinstance(patch, int) else patch
        r = float(self.mllm_config.get("downsample_ratio", 0.5))
        return int(size[0] // patch[0] * r), int(size[1] // patch[1] * r)

    @property
    def image_size(self) -> int:
        """Pixels per side of a decoded image: latent_size times the DC-AE's spatial factor."""
        return self.latent_size * 2 ** (len(self.vae_config["decoder_block_out_channels"]) - 1)

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field, got, expected):
            raise ValueError(f"SparConfig {self.name!r}: {field} = {got!r}, expected {expected}")

        for f in ("mllm_config", "dit_config", "vae_config"):
            if not isinstance(getattr(self, f), dict):
                bad(f, type(getattr(self, f)).__name__, "a config dict")
        L = self.num_llm_layers
        # one explicit check per field, in field order (so the first error names the first bad
        # field, with its own expectation): the checks look alike by design
        if self.num_queries < 1:
            bad("num_queries", self.num_queries, ">= 1")
        if not self.dtr_layers or any(not 0 <= i <= L for i in self.dtr_layers):
            bad("dtr_layers", self.dtr_layers, f"a non-empty list of hidden-state indices in [0, {L}]")
        if not self.dtr_tau > 0:
            bad("dtr_tau", self.dtr_tau, "> 0")
        if not self.dtr_norm_eps > 0:
            bad("dtr_norm_eps", self.dtr_norm_eps, "> 0")
        if self.connector_layers < 1:
            bad("connector_layers", self.connector_layers, ">= 1")
        if self.dit_config.get("in_channels") != self.latent_channels:
            bad("dit_config['in_channels']", self.dit_config.get("in_channels"),
                f"latent_channels = {self.latent_channels}")
        if self.dit_config.get("out_channels", self.latent_channels) not in (None, self.latent_channels):
            bad("dit_config['out_channels']", self.dit_config.get("out_channels"),
                f"latent_channels = {self.latent_channels} (the DiT predicts the latent's velocity)")
        if self.vae_config.get("latent_channels") != self.latent_channels:
            bad("vae_config['latent_channels']", self.vae_config.get("latent_channels"),
                f"latent_channels = {self.latent_channels}")
        if self.latent_size < 1:
            bad("latent_size", self.latent_size, ">= 1")
        if not self.vae_scale_factor > 0:
            bad("vae_scale_factor", self.vae_scale_factor, "> 0")
        if not self.flow_shift > 0:
            bad("flow_shift", self.flow_shift, "> 0")
        if self.num_steps < 1:
            bad("num_steps", self.num_steps, ">= 1")
        if self.is_internvl:
            v = self.mllm_config["vision_config"]
            size, patch = v["image_size"], v["patch_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
            for s, p in zip(size, patch):
                if p < 1 or s % p:
                    bad("mllm_config['vision_config']['image_size']", v["image_size"],
                        f"a multiple of patch_size {v['patch_size']} (the vision tower's patch grid)")
                r = float(self.mllm_config.get("downsample_ratio", 0.5))
                if not (s // p * r).is_integer() or s // p * r < 1:
                    bad("mllm_config['downsample_ratio']", r, f"a ratio that turns the {s // p}-patch side "
                        "into a whole number of image tokens (pixel shuffle)")
        if self.tokenizer is not None:
            self._validate_tokenizer(bad)

    def _validate_tokenizer(self, bad) -> None:
        tcfg = TokenizerConfig.from_dict(self.tokenizer, where=f"SparConfig {self.name!r}: tokenizer")
        tcfg.check_width(self.hidden_size, where=f"SparConfig {self.name!r}: tokenizer")
        grid = self.image_token_grid
        if grid is None:
            bad("tokenizer", self.tokenizer, "None for a text-only MLLM (the tokenizer encodes InternVL image "
                "features)")
        if grid != (self.latent_size, self.latent_size):
            v = self.mllm_config["vision_config"]
            bad("the image-token grid", f"{grid[0]}x{grid[1]}",
                f"the {self.latent_size}x{self.latent_size} latent grid (latent_size) when a tokenizer is "
                f"configured (images of {v['image_size']} px, patch {v['patch_size']}, downsample_ratio "
                f"{self.mllm_config.get('downsample_ratio', 0.5)})")

    # ---- conversions ---------------------------------------------------------------------------
    def spar_json(self) -> dict:
        """The content of ``spar_config.json``."""
        d = {k: getattr(self, k) for k in SPAR_JSON_KEYS}
        d["dtr_layers"] = list(self.dtr_layers)
        if self.tokenizer is not None:
            d["tokenizer"] = dict(self.tokenizer)
        return d

    def tokenizer_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the image tokenizer's tensors in ``spar.safetensors`` (optional keys:
        a checkpoint may leave them out); empty when no tokenizer is configured."""
        if self.tokenizer is None:
            return {}
        from .image_tokenizer import param_shapes

        return param_shapes(TokenizerConfig.from_dict(self.tokenizer), self.hidden_size, self.latent_channels)

    def spar_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors in ``spar.safetensors`` (the connector named like a Qwen2Model)."""
        D, K, C = self.hidden_size, len(self.dtr_layers), self.caption_channels
        shapes: dict[str, tuple[int, ...]] = {
            "latent_queries": (self.num_queries, D),
            "dtr.router.0.weight": (D // 2, D), "dtr.router.0.bias": (D // 2,),
            "dtr.router.2.weight": (K, D // 2), "dtr.router.2.bias": (K,),
            "dtr.alpha": (K,), "dtr.norm.weight": (D,), "dtr.norm.bias": (D,),
            "dtr.proj.weight": (D, D), "dtr.proj.bias": (D,),
            "projector.weight": (C, D), "projector.bias": (C,),
        }
        t = self.text_config
        heads, kv = int(t["num_attention_heads"]), int(t["num_key_value_heads"])
        hd = int(t.get("head_dim") or D // heads)
        ffn = int(t["intermediate_size"])
        for i in range(self.connector_layers):
            p = f"connector.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj.weight": (heads * hd, D), p + "self_attn.q_proj.bias": (heads * hd,),
                p + "self_attn.k_proj.weight": (kv * hd, D), p + "self_attn.k_proj.bias": (kv * hd,),
                p + "self_attn.v_proj.weight": (kv * hd, D), p + "self_attn.v_proj.bias": (kv * hd,),
                p + "self_attn.o_proj.weight": (D, heads * hd),
                p + "mlp.gate_proj.weight": (ffn, D), p + "mlp.up_proj.weight": (ffn, D),
                p + "mlp.down_proj.weight": (D, ffn),
                p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            })
        shapes["connector.norm.weight"] = (D,)
        return shapes

    def replace(self, **changes) -> "SparConfig":
        """A copy with some fields changed (component configs are deep-copied)."""
        fields = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        fields.update(changes)
        return SparConfig(**fields)

    def with_layers(self, *, llm_layers: int | None = None, dit_layers: int | None = None,
                    connector_layers: int | None = None, vision_layers: int | None = None,
                    pixel_layers: int | None = None) -> "SparConfig":
        """The same widths with fewer (or more) layers: for CPU benchmarks of full-width models.

        With ``llm_layers``, the DTR layers are re-spaced evenly up to the new last layer.
        """
        mllm = copy.deepcopy(self.mllm_config)
        text = mllm["text_config"] if "text_config" in mllm else mllm
        changes: dict[str, Any] = {"mllm_config": mllm}
        suffix = []
        if llm_layers is not None:
            text["num_hidden_layers"] = int(llm_layers)
            text.pop("layer_types", None)
            changes["dtr_layers"] = _evenly_spaced(int(llm_layers), min(len(self.dtr_layers), int(llm_layers)))
            suffix.append(f"llm{llm_layers}")
        if vision_layers is not None and "vision_config" in mllm:
            mllm["vision_config"]["num_hidden_layers"] = int(vision_layers)
            suffix.append(f"vit{vision_layers}")
        if dit_layers is not None:
            dit = copy.deepcopy(self.dit_config)
            dit["num_layers"] = int(dit_layers)
            changes["dit_config"] = dit
            suffix.append(f"dit{dit_layers}")
        if connector_layers is not None:
            changes["connector_layers"] = int(connector_layers)
            suffix.append(f"conn{connector_layers}")
        if pixel_layers is not None and self.tokenizer is not None:
            changes["tokenizer"] = {**self.tokenizer, "pixel_layers": int(pixel_layers)}
            suffix.append(f"pix{pixel_layers}")
        changes["name"] = self.name + ("[" + ",".join(suffix) + "]" if suffix else "")
        return self.replace(**changes)

    @classmethod
    def from_json(cls, spar_json: dict, mllm_config: dict, dit_config: dict, vae_config: dict,
                  name: str = "checkpoint") -> "SparConfig":
        missing = [k for k in SPAR_JSON_KEYS if k not in spar_json]
        if missing:
            raise ValueError(f"spar_config.json of {name!r}: missing field(s) {', '.join(missing)}; "
                             f"expected all of {', '.join(SPAR_JSON_KEYS)}")
        kw = {k: spar_json[k] for k in SPAR_JSON_KEYS}
        kw.update({k: spar_json[k] for k in OPTIONAL_JSON_KEYS if spar_json.get(k) is not None})
        return cls(name=name, mllm_config=mllm_config, dit_config=dit_config, vae_config=vae_config, **kw)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "SparConfig":
        """Read ``spar_config.json`` and the component ``config.json`` files of a checkpoint folder."""
        from .loading import CheckpointError, read_json

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint folder")
        spar = read_json(os.path.join(path, "spar_config.json"))
        comps = {}
        for key in ("mllm", "dit", "vae"):
            sub = spar.get(key)
            if not isinstance(sub, str) or not sub:
                raise CheckpointError(f"{path}/spar_config.json: field {key!r} must name the component "
                                      f"folder, got {sub!r}")
            comps[key] = read_json(os.path.join(path, sub, "config.json"))
        try:
            return cls.from_json(spar, comps["mllm"], comps["dit"], comps["vae"], name=os.path.basename(path))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: invalid configuration: {e}") from e


def _spar_full(name: str, text: dict, dit: dict) -> SparConfig:
    """A released SPAR size: its Qwen2.5 LLM config ``text`` and SANA DiT config ``dit``; the rest
    (InternViT-300M, DC-AE f32c32 at 512 px, 256 queries, DTR over 4 evenly spaced layers) is shared."""
    return SparConfig(
        name=name, num_queries=256, dtr_layers=_evenly_spaced(text["num_hidden_layers"]), dtr_tau=1.0,
        dtr_norm_eps=1e-5, connector_layers=6, latent_channels=32, latent_size=16, vae_scale_factor=0.41407,
        flow_shift=3.0, num_steps=20, guidance=4.5, mllm_config=_internvl(_internvit(), text), dit_config=dit,
        vae_config=_dcae_f32c32(), tokenizer=dict(DEFAULT_TOKENIZER))


def _spar_1b() -> SparConfig:
    return _spar_full("SPAR-1B", _qwen2(896, 24, 14, 2, 4864, tie=True),  # Qwen2.5-0.5B
                      _sana(36, 32, 28, 16, 72))                          # SANA-0.6B (512 px)


def _spar_3b() -> SparConfig:
    return _spar_full("SPAR-3B", _qwen2(1536, 28, 12, 2, 8960, tie=True),  # Qwen2.5-1.5B
                      _sana(70, 32, 20, 20, 112))                          # SANA-1.6B (512 px)


def _tiny() -> SparConfig:
    """A few-hundred-thousand-parameter SPAR for tests and ``spar generate --config tiny``.

    Byte-level prompts fit its vocabulary (ids 0..255 are the UTF-8 bytes, see
    :class:`spar_runtime.pipeline.ByteTokenizer`); 64 px images (patch 4: 16x16 patches,
    pixel-shuffled to 8x8) give 64 image tokens, the 8x8 latent grid the image tokenizer needs.
    """
    text = _qwen2(64, 4, 4, 2, 96, vocab=320, theta=10000.0, max_pos=1024)
    vision = _internvit(hidden=32, layers=2, heads=2, ffn=64, image=64, patch=4)
    vae = {"_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 8,
           "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
           "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
           "encoder_block_out_channels": [8, 16, 32], "decoder_block_out_channels": [8, 16, 32],
           "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
           "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]],
           "upsample_block_type": "interpolate", "downsample_block_type": "conv",
           "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "encoder_out_shortcut": True,
           "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 0.5}
    return SparConfig(
        name="tiny", num_queries=8, dtr_layers=(1, 2, 4), dtr_tau=1.0, dtr_norm_eps=1e-5, connector_layers=2,
        latent_channels=32, latent_size=8, vae_scale_factor=0.5, flow_shift=3.0, num_steps=4, guidance=4.5,
        mllm_config=_internvl(vision, text, image_token_id=300),
        dit_config=_sana(2, 16, 2, 2, 16, caption_channels=48, sample_size=8),
        vae_config=vae, tokenizer={"pixel_layers": 2, "pixel_heads": 2, "mlp_blocks": 3})


CONFIGS = {"SPAR-1B": _spar_1b, "SPAR-3B": _spar_3b, "tiny": _tiny}
SPAR_1B, SPAR_3B, TINY = _spar_1b(), _spar_3b(), _tiny()


def get_config(name: str | SparConfig) -> SparConfig:
    """A fresh copy of a named config (``"SPAR-1B"``, ``"SPAR-3B"``, ``"tiny"``); a SparConfig passes through."""
    if isinstance(name, SparConfig):
        return name
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"config: got {name!r}, expected a SparConfig or one of {', '.join(CONFIGS)}")
    return CONFIGS[name]()
