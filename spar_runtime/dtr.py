"""Dynamic Token Routing (DTR): a per-token soft mixture of K LLM hidden states.

For every token t (width D), with ``hidden`` the [L+1, N, D] buffer of hidden states as
transformers returns them with ``output_hidden_states=True`` (0 = embeddings, L = final normed
output) and ``layer_ids`` the K routed indices (the router reads the last one)::

    logits[t] = router(hidden[layer_ids[-1], t])        # Linear(D, D/2) -> SiLU -> Linear(D/2, K)
    w[t]      = softmax(logits[t] / tau)
    m[t]      = sum_k w[t, k] * alpha[k] * hidden[layer_ids[k], t]
    out[t]    = proj(LayerNorm(m[t]))                   # LayerNorm(D, eps) then Linear(D, D)

The router and the projection are GEMMs; the mixture + LayerNorm is one pass of
``spar_kernels.route_layers`` (one read of the K selected rows, one write, fp32 accumulation).
Weights are the ``dtr.*`` tensors of ``spar.safetensors`` (names in :func:`dtr_param_shapes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spar_kernels as sk

from .fp8 import Fp8Weight, linear

__all__ = ["DynamicTokenRouting", "dtr_param_shapes"]


def dtr_param_shapes(hidden_size: int, num_layers: int, prefix: str = "dtr.") -> dict[str, tuple[int, ...]]:
    """Names and shapes of the DTR weights for width D = ``hidden_size`` and K = ``num_layers``."""
    D, K = hidden_size, num_layers
    return {prefix + "router.0.weight": (D // 2, D), prefix + "router.0.bias": (D // 2,),
            prefix + "router.2.weight": (K, D // 2), prefix + "router.2.bias": (K,),
            prefix + "alpha": (K,), prefix + "norm.weight": (D,), prefix + "norm.bias": (D,),
            prefix + "proj.weight": (D, D), prefix + "proj.bias": (D,)}


class DynamicTokenRouting:
    """DTR over a preallocated hidden-state buffer.

    Args:
        weights: the ``dtr.*`` tensors with the ``dtr.`` prefix stripped (``router.0.weight``, ...),
            already on the device and in the dtype to run in.
        layer_ids: the K hidden-state indices (``spar_config.json``'s ``dtr_layers``).
        tau: softmax temperature. eps: LayerNorm epsilon.
    """

    def __init__(self, weights: dict[str, torch.Tensor], layer_ids, *, tau: float = 1.0, eps: float = 1e-5):
        self.w = weights
        self.layer_ids_list = [int(i) for i in layer_ids]
        if not self.layer_ids_list:
            raise ValueError("layer_ids: expected at least one hidden-state index, got an empty list")
        device = weights["alpha"].device
        self.layer_ids = torch.tensor(self.layer_ids_list, dtype=torch.int64, device=device)
        self.tau, self.eps = float(tau), float(eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [N, K] from the last routed hidden state."""
        w = self.w
        h = linear(hidden[self.layer_ids_list[-1]], w["router.0.weight"], w["router.0.bias"])
        return linear(F.silu(h), w["router.2.weight"], w["router.2.bias"])

    def __call__(self, hidden: torch.Tensor, *, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``: [L+1, N, D]; returns [N, D] (or [M, D] for ``rows``) in hidden's dtype."""
        L1 = hidden.shape[0]
        if max(self.layer_ids_list) >= L1:
            raise ValueError(f"hidden: has {L1} hidden states, but dtr layer {max(self.layer_ids_list)} is routed")
        w = self.w
        mixed = sk.route_layers(hidden, self.layer_ids, self.logits(hidden), w["alpha"], w["norm.weight"],
                                w["norm.bias"], tau=self.tau, eps=self.eps, rows=rows)
        if out is None or isinstance(w["proj.weight"], Fp8Weight):
            y = linear(mixed, w["proj.weight"], w["proj.bias"])
            return y if out is None else out.copy_(y)
        return torch.addmm(w["proj.bias"], mixed, w["proj.weight"].t(), out=out)
