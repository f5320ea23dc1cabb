"""spar_runtime: a lean runtime executing the whole SPAR graph on spar_kernels ops.

    from spar_runtime import SparPipeline
    pipe = SparPipeline.from_pretrained("path/to/spar-checkpoint")      # or SparPipeline.random("tiny", 0)
    images = pipe.generate("a red fox in the snow")

Submodules: ``configs`` (SPAR-1B, SPAR-3B, tiny), ``loading`` (safetensors checkpoints), ``qwen2``
(LLM and connector), ``internvl`` (vision tower, understanding), ``dtr`` (dynamic token routing),
``sana`` (DiT), ``dcae`` (pixel decoder), ``image_tokenizer`` (image -> generation latent),
``pipeline`` (SparPipeline), ``cli`` (the ``spar`` command).
Names are imported lazily, so importing one submodule does not load the others.
"""

import importlib

__all__ = ["SparPipeline", "SparConfig", "CheckpointError", "configs"]

_LAZY = {"SparPipeline": "pipeline", "SparConfig": "configs", "CheckpointError": "loading"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "configs":
        return importlib.import_module(".configs", __name__)
    raise AttributeError(f"module 'spar_runtime' has no attribute {name!r}")
