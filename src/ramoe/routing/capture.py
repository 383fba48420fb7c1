"""Router logits captured with forward hooks, for plain forward passes and for ``generate``.

``output_router_logits=True`` returns the same logits for a single forward call, but
``generate`` drops them, so hooks are the only way to see routing while generating.

Mapping the entries of a ``generate`` call back to tokens, with the default KV cache:

* Entry 0 of ``RouterCapture.logits[layer]`` is the prefill. It has ``batch * prompt_len``
  rows, padding included. ``per_sequence(entry, attention_mask)`` with the prompt's attention
  mask returns the routing of each prompt's real tokens.
* Entry ``t`` for ``t >= 1`` is decode step ``t``. It has one row per sequence (``batch``
  rows, or ``batch * num_return_sequences`` when sampling), and row ``b`` routes the token
  that step ``t - 1`` generated for sequence ``b``, i.e. ``sequences[b, prompt_len + t - 1]``.
* ``max_new_tokens=n`` therefore gives at most ``n`` entries: the last generated token is
  never fed back, so it has no routing. A sequence that already produced EOS still gets rows
  for its padding tokens until the whole batch stops. Drop those rows by the EOS position.
* Without a cache (``use_cache=False``) every step reruns the whole sequence, so entry ``t``
  has ``batch * (prompt_len + t)`` rows.
* Beam search has ``batch * num_beams`` rows per step, and ``generate`` reorders the beams
  between steps, so the mapping above does not apply to it.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import torch

from ramoe.routing.adapters import (
    SCORING_SIGMOID,
    SCORING_SOFTMAX,
    SELECTION_GROUPED_SIGMOID,
    SELECTION_SOFTMAX_TOP_K,
    SELECTION_TOP_K_SOFTMAX,
    MoELayout,
    describe_moe,
    select_top_k,
)

log = logging.getLogger(__name__)

# Selection rules whose top-k weights already come sorted, descending, from torch.topk: a
# softmax, or a division by a positive sum, keeps the order. A stable sort would change nothing.
_SORTED_SELECTIONS = frozenset({SELECTION_SOFTMAX_TOP_K, SELECTION_TOP_K_SOFTMAX})


class RouterCapture:
    """Context manager that registers forward hooks on every router of ``model`` (by module name from describe_moe).

    Inside the ``with`` block every router call appends its (tokens, experts) logits, cast to
    float32, to ``logits[layer]``. ``layer`` is the true decoder layer index, so dense layers
    are absent rather than renumbered. The logits are detached unless ``keep_graph`` is set,
    in which case a loss on ``probabilities`` or ``top_k`` weights backpropagates into the
    router weights.

    Every router call appends one entry, so with gradient checkpointing the recomputation in
    the backward pass appends a second entry for the same tokens. ``router_ids[layer]`` gets
    the (tokens, top_k) expert ids the router itself returned with those logits, or None for a
    router that returns no ids.
    """

    def __init__(self, model: torch.nn.Module, layout: MoELayout | None = None, *, keep_graph: bool = False):
        self.model = model
        self.layout = layout if layout is not None else describe_moe(model)
        self.keep_graph = keep_graph

        modules = dict(model.named_modules())
        missing = [name for name in self.layout.router_modules.values() if name not in modules]
        if missing:
            raise ValueError(
                f"router modules {missing} of the layout are not found in {type(model).__name__}. "
                "Build the layout with describe_moe(model) on this model."
            )
        self._routers = {layer: modules[name] for layer, name in self.layout.router_modules.items()}
        self.logits: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layout.moe_layers}
        self.router_ids: dict[int, list[torch.Tensor | None]] = {layer: [] for layer in self.layout.moe_layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RouterCapture:
        if self._handles:
            raise RuntimeError("this RouterCapture is already active. Exit it before entering it again.")
        for layer, router in self._routers.items():
            self._handles.append(router.register_forward_hook(self._make_hook(layer)))
        log.debug("registered router hooks on %d layers of %s", len(self._handles), self.layout.family)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):
        def record_logits(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # Every supported router returns (router_logits, top_k_weights, top_k_ids).
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.reshape(-1, logits.shape[-1])
            if not self.keep_graph:
                logits = logits.detach()
            self.logits[layer].append(logits.float())
            ids = output[2] if isinstance(output, tuple) and len(output) >= 3 else None
            if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
                self.router_ids[layer].append(ids.detach().reshape(logits.shape[0], -1))
            else:
                self.router_ids[layer].append(None)

        return record_logits

    def clear(self) -> None:
        """Drop all captured logits and router ids but keep the hooks."""
        for entries in (*self.logits.values(), *self.router_ids.values()):
            entries.clear()

    def probabilities(self, layer: int, call: int | None = None) -> torch.Tensor:
        """Compute the (tokens, experts) float32 routing distribution of ``layer``.

        Softmax families give the softmax of the logits. Sigmoid families (DeepSeek-V3) give the
        sigmoid scores divided by their sum over experts, without the correction bias, so each
        row sums to 1. ``call`` selects one forward call; by default all calls are concatenated
        in order.
        """
        return self._distribution(self._layer_logits(layer, call))

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor:
        if self.layout.scoring == SCORING_SOFTMAX:
            return torch.softmax(logits, dim=-1)
        if self.layout.scoring == SCORING_SIGMOID:
            scores = logits.sigmoid()
            return scores / scores.sum(dim=-1, keepdim=True)
        raise ValueError(f"invalid scoring {self.layout.scoring!r} in the layout of {self.layout.family!r}.")

    def top_k(self, layer: int, call: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute the router's top-k ``(ids, weights)`` of ``layer``, each (tokens, top_k).

        The computation runs in float32 and follows the family's router, including
        ``norm_topk_prob`` and DeepSeek-V3's group selection, correction bias and
        ``routed_scaling_factor``. Columns are sorted by weight, descending. The bias is read from
        the router when this method runs, not when the logits were captured.
        """
        ids, weights = select_top_k(self._layer_logits(layer, call), self.layout, self._routers[layer])
        return _sorted_by_weight(ids, weights, self.layout.selection)

    def all_layers(self, call: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``probabilities``, and ``top_k`` ids and weights, of every MoE layer for one forward call.

        The results are (tokens, layers, experts) and twice (tokens, layers, top_k), with layers in
        ``layout.moe_layers`` order, and equal what the per-layer methods return. Where the
        selection rule does not read the router module (every rule but ``grouped_sigmoid``),
        each is computed once over all layers, not once per layer.

        For ``softmax_top_k`` the ids are the ones the routers returned, when they all did. The
        routers of OLMoE, Qwen-MoE and Mixtral take torch.topk of the same float32 softmax, so
        their ids equal the recomputed ones. Computing torch.topk again on the CPU cost about 4%
        of a forward of the default model. The weights are the distribution at those ids,
        normalized where the family normalizes them.
        """
        layers = self.layout.moe_layers
        logits = torch.stack([self._layer_logits(layer, call) for layer in layers], dim=1)  # (T, L, E)
        probabilities = self._distribution(logits)
        if self.layout.selection == SELECTION_SOFTMAX_TOP_K and self.layout.scoring == SCORING_SOFTMAX:
            router_ids = [self.router_ids[layer][call] for layer in layers]
            expected_shape = (logits.shape[0], self.layout.top_k)
            if all(ids is not None and tuple(ids.shape) == expected_shape for ids in router_ids):
                ids = torch.stack(router_ids, dim=1).to(device=probabilities.device, dtype=torch.long)
                weights = probabilities.gather(-1, ids)
                if self.layout.selection_options.get("normalize", False):
                    weights = weights / weights.sum(dim=-1, keepdim=True)
                return probabilities, ids, weights
        if self.layout.selection == SELECTION_GROUPED_SIGMOID:
            pairs = [self.top_k(layer, call) for layer in layers]
            return probabilities, torch.stack([ids for ids, _ in pairs], dim=1), torch.stack([w for _, w in pairs], dim=1)
        softmax = probabilities if self.layout.scoring == SCORING_SOFTMAX else None
        ids, weights = select_top_k(logits, self.layout, softmax=softmax)
        return (probabilities, *_sorted_by_weight(ids, weights, self.layout.selection))

    def _layer_logits(self, layer: int, call: int | None) -> torch.Tensor:
        if layer not in self.logits:
            raise KeyError(f"layer {layer} has no router. MoE layers of {self.layout.family!r}: {self.layout.moe_layers}")
        entries = self.logits[layer]
        if not entries:
            raise LookupError(
                f"no router logits captured for layer {layer}. Run the model inside `with RouterCapture(...)`."
            )
        if call is None:
            return torch.cat(entries, dim=0)
        return entries[call]


def _sorted_by_weight(ids: torch.Tensor, weights: torch.Tensor, selection: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort top-k columns by weight, descending. A stable sort keeps the router's order among ties."""
    if selection in _SORTED_SELECTIONS:
        return ids, weights
    weights, order = weights.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), weights


def per_sequence(flat: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Split the (batch*seq, ...) rows of ONE forward call into per-sequence tensors of non-padding tokens.

    ``attention_mask`` is the (batch, seq) mask of that call. Rows are in batch-major order, as
    the routers flatten their input. Works for left and right padding.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}.")
    batch, seq_len = attention_mask.shape
    if flat.shape[0] != batch * seq_len:
        raise ValueError(
            f"got {flat.shape[0]} rows, but the attention mask covers {batch} x {seq_len} = {batch * seq_len} "
            "tokens. Pass the rows of a single forward call (one entry of RouterCapture.logits)."
        )
    rows = flat.reshape(batch, seq_len, *flat.shape[1:])
    keep = attention_mask.to(device=flat.device, dtype=torch.bool)
    return [rows[index][keep[index]] for index in range(batch)]
