"""The ``spar`` command line.

    spar generate --checkpoint DIR --prompt "a red fox" --steps 20 --guidance 4.5 --seed 0 --out out.png
    spar generate --config tiny --random-weights --prompt "anything" --out out.png
    spar describe --checkpoint DIR --image x.png --prompt "Describe the image." --max-new-tokens 64
    spar reconstruct --checkpoint DIR --image x.png --out y.png     (also --config tiny --random-weights)

``generate`` shows a progress bar over the solver steps and ends with a per-stage timing table
(load, prefill, DTR, connector, DiT loop, decode, total). ``--random-weights`` builds the named
config with random weights (no files needed; prompts are byte-tokenized), which exercises the
whole path but draws noise-like images. ``reconstruct`` encodes the image with the dual-stream image
tokenizer, decodes the latent and prints the PSNR of the reconstruction against the input resized to
the output size.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch

__all__ = ["main"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_PROMPT = "a red fox sitting in the snow"


class _Progress:
    """A progress bar over solver steps: tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        width = 30
        done = int(width * step / total)
        rate = step / max(time.perf_counter() - self.t0, 1e-9)
        sys.stderr.write(f"\rdenoising [{'#' * done}{'.' * (width - done)}] {step}/{total} {rate:.2f} step/s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def timing_table(timings: dict[str, float], load_s: float | None = None) -> str:
    """Markdown table of per-stage wall times (seconds and share of the generation total)."""
    rows = [("load", load_s)] if load_s is not None else []
    rows += [(k, timings.get(k)) for k in ("prefill", "dtr", "connector", "dit_loop", "decode")]
    total = sum(v for k, v in rows if v is not None and k != "load")
    lines = ["| stage | seconds | share |", "|---|---:|---:|"]
    for name, v in rows:
        if v is None:
            continue
        share = "" if name == "load" or total <= 0 else f"{100 * v / total:.1f}%"
        lines.append(f"| {name} | {v:.3f} | {share} |")
    lines.append(f"| total (prefill..decode) | {total:.3f} | 100% |")
    return "\n".join(lines)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="a SPAR checkpoint directory (spar_config.json, mllm/, dit/, vae/, "
                                          "spar.safetensors)")
    src.add_argument("--config", help="a named config (SPAR-1B, SPAR-3B, tiny); needs --random-weights")
    src.add_argument("--random-weights", action="store_true", help="random weights for --config (no files needed)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: W8A8 linears quantized at load (needs sm_89+ on CUDA)")
    p.add_argument("--graphs", default=None, action=argparse.BooleanOptionalAction,
                   help="static plans (CUDA graphs on CUDA); default: on for CUDA, off for CPU")


def _load(args, parser):
    from .pipeline import SparPipeline

    dtype = _DTYPES[args.dtype] if args.dtype else None
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: expected a torch device such as cpu or cuda, got {args.device!r}")
        if dev.type not in ("cpu", "cuda"):
            parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch has no usable CUDA device")
        args.device = "cpu" if dev.type == "cpu" else str(dev)   # one CPU device: "cpu:0" is "cpu"
    if args.checkpoint and (args.config or args.random_weights):
        parser.error("give either --checkpoint DIR or --config NAME --random-weights, not both")
    if args.checkpoint:
        return SparPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=dtype,
                                            quantization=args.quantization, graphs=args.graphs)
    if args.config and args.random_weights:
        return SparPipeline.random(args.config, args.weights_seed, device=args.device, dtype=dtype,
                                   quantization=args.quantization, graphs=args.graphs)
    if args.config:
        parser.error("--config NAME needs --random-weights (no official SPAR weights are public); "
                     "or load real weights with --checkpoint DIR")
    parser.error("give --checkpoint DIR, or --config NAME --random-weights")


def _generate(args, parser) -> int:
    t0 = time.perf_counter()
    pipe = _load(args, parser)
    load_s = time.perf_counter() - t0
    pipe.sync_timings = True
    steps = args.steps if args.steps is not None else pipe.config.num_steps
    guidance = args.guidance if args.guidance is not None else pipe.config.guidance
    print(f"spar generate: {pipe.config.name} on {pipe.device} ({str(pipe.dtype)[6:]}), {steps} steps "
          f"{args.sampler}, guidance {guidance}, seed {args.seed}, prompt {args.prompt!r}", file=sys.stderr)
    progress = _Progress(steps, not args.no_progress)
    try:
        images = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, num_steps=steps,
                               guidance=guidance, seed=args.seed, sampler=args.sampler, shift=args.shift,
                               callback=progress)
    finally:
        progress.close()
    images[0].save(args.out)
    print(f"wrote {args.out} ({images[0].size[0]}x{images[0].size[1]})")
    print(timing_table(pipe.timings, load_s))
    return 0


def _describe(args, parser) -> int:
    from PIL import Image

    t0 = time.perf_counter()
    pipe = _load(args, parser)
    load_s = time.perf_counter() - t0
    image = Image.open(args.image)
    t1 = time.perf_counter()
    text = pipe.describe(image, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    print(text)
    print(f"load {load_s:.3f} s, describe {time.perf_counter() - t1:.3f} s", file=sys.stderr)
    return 0


def psnr(a, b) -> float:
    """PSNR in dB between two same-size 8-bit RGB PIL images: ``10 log10(255^2 / MSE)`` (inf if equal)."""
    import math

    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr: images of different sizes {x.shape} and {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _reconstruct(args, parser) -> int:
    from PIL import Image

    t0 = time.perf_counter()
    pipe = _load(args, parser)
    load_s = time.perf_counter() - t0
    image = Image.open(args.image).convert("RGB")
    t1 = time.perf_counter()
    out = pipe.to_pil(pipe.reconstruct(image))[0]
    run_s = time.perf_counter() - t1
    out.save(args.out)
    target = image.resize(out.size, Image.BICUBIC)
    try:
        with Image.open(args.out) as saved:   # the file as written: a lossy format (JPEG) loses more
            saved = saved.convert("RGB")
    except (OSError, ValueError):  # a format PIL writes but cannot read back (PDF, EPS without Ghostscript)
        saved = None
    if saved is None:
        print(f"wrote {args.out} ({out.size[0]}x{out.size[1]}); PSNR {psnr(out, target):.2f} dB against the input "
              f"resized to {out.size[0]}x{out.size[1]}, before saving (PIL cannot read this format back)")
    else:
        print(f"wrote {args.out} ({out.size[0]}x{out.size[1]}); PSNR {psnr(saved, target):.2f} dB against the "
              f"input resized to {out.size[0]}x{out.size[1]}" + ("" if psnr(saved, target) == psnr(out, target)
                                                                 else f" ({psnr(out, target):.2f} dB before saving)"))
    print(f"load {load_s:.3f} s, reconstruct {run_s:.3f} s (encode {pipe.timings.get('encode_image', 0):.3f} s, "
          f"decode {pipe.timings.get('decode', 0):.3f} s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar", description="SPAR text-to-image and image understanding")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    _add_model_args(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the text prompt (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--negative-prompt", default=None, help="the unconditional prompt (default: a fixed instruction)")
    g.add_argument("--steps", type=int, default=None, help="solver steps (default: the config's num_steps)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the config's guidance)")
    g.add_argument("--sampler", default="dpmsolver++2m", choices=["dpmsolver++2m", "euler"])
    g.add_argument("--shift", type=float, default=None, help="flow shift (default: the config's flow_shift)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="out.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("describe", help="image understanding (InternVL)")
    _add_model_args(d)
    d.add_argument("--image", required=True)
    d.add_argument("--prompt", default="Describe the image.")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r = sub.add_parser("reconstruct", help="image -> tokenizer latent -> DC-AE decode, with PSNR")
    _add_model_args(r)
    r.add_argument("--image", required=True)
    r.add_argument("--out", default="reconstruction.png")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")
    out = getattr(args, "out", None)
    if out is not None:   # before minutes of work, not after
        from PIL import Image

        fmt = Image.registered_extensions().get(os.path.splitext(out)[1].lower())
        if fmt is None or fmt not in Image.SAVE:
            parser.error(f"--out: {out!r} has no image extension PIL can write (e.g. .png)")
        try:  # a registered writer may still be a stub or refuse RGB: write a small RGB image in memory
            Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
        except Exception as e:  # noqa: BLE001 - whatever the plugin raises, it would raise after the run
            parser.error(f"--out: PIL cannot write an RGB image as {fmt} ({out!r}): {e}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            parser.error(f"--out: the folder of {out!r} does not exist")
    try:
        run = {"generate": _generate, "describe": _describe, "reconstruct": _reconstruct}[args.command]
        return run(args, parser)
    except (ValueError, TypeError, OSError) as e:   # CheckpointError is a ValueError
        print(f"spar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
