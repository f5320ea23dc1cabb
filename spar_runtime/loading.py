"""Checkpoint loading: safetensors only, with errors that name what is missing or mis-shaped.

Every spar_runtime component loads through here:

- :func:`read_json` reads a config file (``config.json``, ``spar_config.json``);
- :func:`load_safetensors_dir` reads the weights of a component folder in its public format
  (transformers' ``model.safetensors``, diffusers' ``diffusion_pytorch_model.safetensors``, or
  the shards named by a ``*.safetensors.index.json``), or one ``.safetensors`` file;
- :func:`check_state_dict` compares what was read with the names and shapes a module expects.

Pickle-based checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) are refused: loading
them executes code from the file. Convert them with ``safetensors.torch.save_file`` first.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch

__all__ = ["CheckpointError", "PICKLE_SUFFIXES", "read_json", "load_safetensors_file",
           "load_safetensors_dir", "check_state_dict", "load_component", "check_config_class"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SINGLE_FILE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")  # transformers, diffusers
_LIST_LIMIT = 20  # names listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing file, pickle format, missing/unknown/mis-shaped keys."""


def default_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype when none is asked: float32 on CPU, bfloat16 on accelerators, float16 on
    CUDA GPUs older than Ampere (sm_70 / sm_75: no bf16 tensor cores, where Triton's bf16 dots fail)."""
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path``; raise :class:`CheckpointError` naming the file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickle-based checkpoints are refused (loading them runs code from the file); "
            "convert the weights to safetensors (safetensors.torch.save_file) first")


_CONVERTIBLE: dict[torch.dtype, bool] = {}


def _convertible(dtype: torch.dtype) -> bool:
    """False for a floating dtype that torch cannot cast to float32 (the packed float4 of
    ``float4_e2m1fn_x2``); True otherwise (other dtypes are check_state_dict's to refuse)."""
    if not dtype.is_floating_point:
        return True
    ok = _CONVERTIBLE.get(dtype)
    if ok is None:
        try:
            torch.zeros(1, dtype=torch.uint8).view(dtype).to(torch.float32) if dtype.itemsize == 1 else \
                torch.zeros(1, dtype=dtype).to(torch.float32)
            ok = True
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
        _CONVERTIBLE[dtype] = ok
    return ok


def _convert(t: torch.Tensor, device, dtype) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype) if device is not None else t.to(dtype=dtype)
    return t.to(device=device) if device is not None else t


def _read_file(path: str, prefix: str | None, device, dtype, names: Iterable[str] | None = None,
               into: dict | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    _refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    out = {} if into is None else into
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys()) if names is None else list(names)
            present = set(f.keys()) if names is not None else None
            for key in keys:
                if present is not None and key not in present:
                    raise CheckpointError(f"{path}: the index maps {key!r} to this file, which does not hold it")
                if prefix is not None:
                    if not key.startswith(prefix):
                        continue
                    name = key[len(prefix):]
                else:
                    name = key
                if name in out:
                    raise CheckpointError(f"{path}: key {key!r} appears in more than one file")
                t = f.get_tensor(key)
                if not _convertible(t.dtype):
                    raise CheckpointError(f"{path}: key {key!r} is {t.dtype}, which this torch cannot convert to "
                                          "the load dtype (expected a float32 / bfloat16 / float16 / float8 weight)")
                out[name] = _convert(t, device, dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    return out


def load_safetensors_file(path: str | os.PathLike, *, prefix: str | None = None, device=None,
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one ``.safetensors`` file (see :func:`load_safetensors_dir` for the arguments)."""
    return _read_file(os.fspath(path), prefix, device, dtype)


def _index_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json"))


def _load_index(folder: str, index_name: str, prefix, device, dtype) -> dict[str, torch.Tensor]:
    index_path = os.path.join(folder, index_name)
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] must be a file name, got {fname!r}")
        if prefix is None or key.startswith(prefix):
            by_file.setdefault(fname, []).append(key)
    shard_names = sorted(set(weight_map.values()))
    for fname in shard_names:
        _refuse_pickle(os.path.join(folder, fname))
    missing = [f for f in shard_names if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"{index_path}: shard file(s) missing from {folder}: {', '.join(missing)}")
    out: dict[str, torch.Tensor] = {}
    for fname, keys in by_file.items():
        _read_file(os.path.join(folder, fname), prefix, device, dtype, names=keys, into=out)
    return out


def load_safetensors_dir(folder: str | os.PathLike, *, prefix: str | None = None, device=None,
                         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read the weights of a component folder (or a single ``.safetensors`` file).

    Resolution order inside ``folder``: ``model.safetensors`` or
    ``diffusion_pytorch_model.safetensors``; else a ``*.safetensors.index.json``
    (its shards, every one of which must exist); else the folder's ``*.safetensors`` files
    (several are merged, a key present twice is an error). A folder holding only pickle files
    (``pytorch_model.bin``...) is refused.

    Args:
        folder: a directory, or the path of one ``.safetensors`` file.
        prefix: keep only keys starting with it, and strip it from the returned names
            (``prefix="language_model."`` turns ``language_model.model.norm.weight`` into
            ``model.norm.weight``).
        device: where the tensors go (loaded on CPU first).
        dtype: floating-point tensors are converted to it; integer tensors are left as stored.

    Returns:
        ``{name: tensor}``.

    Raises:
        CheckpointError: missing folder or files, pickle checkpoints, invalid files, a key in two files.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        if not folder.endswith(".safetensors"):
            _refuse_pickle(folder)
            raise CheckpointError(f"{folder}: expected a .safetensors file or a folder holding one")
        return _read_file(folder, prefix, device, dtype)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such checkpoint folder or file")
    for name in _SINGLE_FILE_NAMES:
        single = os.path.join(folder, name)
        if os.path.isfile(single):
            return _read_file(single, prefix, device, dtype)
    indexes = _index_files(folder)
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several safetensors index files ({', '.join(indexes)}); expected one")
    if indexes:
        return _load_index(folder, indexes[0], prefix, device, dtype)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        pickles = sorted(n for n in os.listdir(folder) if n.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle-based weights found ({', '.join(pickles)}); they are refused "
                "(loading them runs code from the file); convert them to safetensors first")
        raise CheckpointError(f"{folder}: no weights found (expected model.safetensors, a "
                              "*.safetensors.index.json with its shards, or *.safetensors files)")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        _read_file(os.path.join(folder, name), prefix, device, dtype, into=out)
    return out


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str,
                     key_prefix: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``sd`` holds exactly the ``expected`` names and shapes,
    every one a floating-point tensor torch can cast (weights are cast to the load dtype: an integer
    or bool tensor there is a wrong file, not a value to convert; BatchNorm's ``num_batches_tracked``
    excepted).

    The message lists every missing key, every unexpected key, every mis-shaped key (name, shape
    got, shape expected) and every non-float one (name, dtype), prefixed with ``where`` (e.g. the
    folder it came from); names carry ``key_prefix`` (the prefix a loader stripped), so they are
    the file's keys.
    """
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    misshaped = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k]))
    not_float = sorted(k for k in expected if k in sd and not (sd[k].is_floating_point() and _convertible(sd[k].dtype))
                       and not k.endswith(".num_batches_tracked"))   # BatchNorm's step counter: an int
    if not (missing or unexpected or misshaped or not_float):
        return
    p = key_prefix
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing([p + k for k in missing])}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing([p + k for k in unexpected])}")
    if misshaped:
        shown = [f"{p}{k}: got {tuple(sd[k].shape)}, expected {tuple(expected[k])}" for k in misshaped]
        parts.append(f"mis-shaped keys ({len(misshaped)}): {_listing(shown)}")
    if not_float:
        shown = [f"{p}{k}: {sd[k].dtype}" for k in not_float]
        parts.append(f"keys that are not floating-point tensors torch can cast ({len(not_float)}): "
                     f"{_listing(shown)}")
    raise CheckpointError(f"{where}: " + "; ".join(parts))


def load_component(folder: str | os.PathLike, kind: str, validate, param_shapes, *, prefix: str | None = None,
                   device=None, dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a diffusers component folder (``kind``: the class that wrote it, for error messages):
    its ``config.json``, checked by ``validate(config)``
    (a ``from_dict`` that raises ValueError/TypeError), and its weights (those under ``prefix``,
    the prefix stripped), in ``dtype`` (default: :func:`default_dtype` of ``device``, the CPU when
    None), checked against ``param_shapes(config)``. Returns ``(config, weights)``.

    Raises:
        CheckpointError: an invalid config, no tensors under ``prefix``, or weights that do not
            match ``param_shapes`` (see :func:`check_state_dict`).
    """
    folder = os.fspath(folder)
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else default_dtype(device)
    config = read_json(os.path.join(folder, "config.json"))
    try:
        validate(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    weights = load_safetensors_dir(folder, prefix=prefix, device=device, dtype=dtype)
    if prefix is not None and not weights:
        raise CheckpointError(f"{folder}: no '{prefix}*' tensors found (expected a {kind} checkpoint)")
    check_state_dict(weights, param_shapes(config), folder, key_prefix=prefix or "")
    return config, weights


def check_config_class(d, class_name: str) -> None:
    """Raise unless ``d`` is a dict whose ``_class_name`` (when it has one) is ``class_name``."""
    if not isinstance(d, dict):
        raise TypeError(f"config: expected a dict (the config.json of a {class_name}), got {type(d).__name__}")
    name = d.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"config: _class_name is {name!r}, expected {class_name!r}")
