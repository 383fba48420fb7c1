"""Routing Steering: an inference-time push of the router logits toward task experts.

Routing Steering is the baseline of Bandarkar et al. (2025), "Multilingual Routing in
Mixture-of-Experts" (arXiv:2510.04694, Eqs. 4-5). It changes no weight of the base model. In
the alignment-zone layers only, on every token and before the router's softmax (or sigmoid),
each task expert k of the layer gets

* soft: ``z_k <- z_k + lambda_s * std(z)`` with ``lambda_s = 0.5`` by default, or
* hard: ``z_k <- max(z) + eps``, with eps a draw of standard deviation ``1e-6`` (taken as
  |eps| and at least one float32 step, so that the expert outranks every unsteered one),

where z is the token's (E,) vector of router logits. The arithmetic runs in float32. A layer
may steer at most ``top_k`` experts, because a hard push of more than top_k experts cannot
force them all into the top-k.

We found no public steering code from the authors. Their repository
``lucasbandarkar/xl_moe_alignment`` (for a follow-up paper) has routing analysis but no steering. The std convention and the noise
of the hard rule below are therefore our reading of the equations, marked ``NOTE:`` where set.

``RoutingSteering`` replaces the ``forward`` of each steered router instance. The replacement
calls the router's own forward, steers its logits, recomputes the top-k ids and weights from
the steered logits with the family's own rule (``ramoe.routing.adapters.select_top_k``) and
returns the router's ``(router_logits, top_k_weights, top_k_ids)`` tuple. Every router call
goes through it, so it works for a plain forward pass and for every decode step of
``generate`` with a KV cache.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from ramoe.routing.adapters import (
    SELECTION_GROUPED_SIGMOID,
    SELECTION_SPARSEMIXER,
    MoELayout,
    describe_moe,
    select_top_k,
)

log = logging.getLogger(__name__)

MODES = ("soft", "hard")

DEFAULT_LAMBDA_S = 0.5
# NOTE: our reading of "eps ~ N(0, 1e-6)": 1e-6 is the standard deviation of eps, not its variance.
DEFAULT_NOISE_STD = 1e-6

# Marks a router whose instance dict had no `forward`, so exiting deletes the attribute again.
_NO_INSTANCE_FORWARD = object()


def steer_logits(
    logits: torch.Tensor,
    experts: Sequence[int],
    *,
    mode: str,
    lambda_s: float = DEFAULT_LAMBDA_S,
    top_k: int,
    generator: torch.Generator | None = None,
    noise_std: float = DEFAULT_NOISE_STD,
) -> torch.Tensor:
    """Steer the (tokens, E) router logits of one layer toward ``experts`` and return them in float32.

    ``mode`` is "soft" (add ``lambda_s`` times each token's std over the E logits) or "hard"
    (set to the token's max logit plus a small positive draw). Both read std and max from the
    unsteered logits. ``generator`` drives the hard-mode draws; without one the global RNG of
    the logits' device is used. Empty ``experts`` return the logits unchanged, in float32. The
    input tensor is never modified.

    Raises ValueError for an unknown mode, more experts than ``top_k``, a repeated or
    out-of-range expert id, a non-finite ``lambda_s`` or a negative ``noise_std``.
    """
    _check_mode(mode)
    _check_lambda_s(lambda_s)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"invalid noise_std {noise_std}. The hard-mode noise needs a finite standard deviation >= 0.")
    if logits.dim() < 1:
        raise ValueError("router logits must have an expert dimension, shape (tokens, E), but got a scalar.")
    ids = _check_experts(experts, num_experts=logits.shape[-1], top_k=top_k, where="one layer")

    # .float() returns the same tensor for float32 input, so clone before writing into it.
    steered = logits.float().clone()
    if not ids:
        return steered
    original = logits.float()
    index = torch.tensor(ids, device=logits.device)

    if mode == "soft":
        # NOTE: our reading of std(z): the population std (correction=0) over the E experts of
        # each token. The sample std would be sqrt(E / (E - 1)) times larger.
        shift = lambda_s * original.std(dim=-1, keepdim=True, correction=0)  # (..., 1)
        steered[..., index] = original[..., index] + shift
        return steered

    top = original.max(dim=-1, keepdim=True).values  # (..., 1)
    noise = _hard_noise((*original.shape[:-1], len(ids)), noise_std, generator, original.device)
    # NOTE: our reading of the hard rule takes |eps|, and at least one float32 step above max(z).
    # A negative eps lets the unsteered argmax outrank a forced expert, and a draw below half a
    # float32 step of max(z) (2.4e-7 at 4) rounds to a tie. Either could drop a forced expert
    # from the top-k when a layer forces top_k experts.
    floor = torch.nextafter(top, torch.full_like(top, math.inf))
    steered[..., index] = torch.maximum(top + noise.abs(), floor)
    return steered


def _hard_noise(
    shape: tuple[int, ...], noise_std: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Draw N(0, noise_std^2) noise of ``shape`` on the generator's device and move it to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device) * noise_std
    # A CPU generator gives the same draws whatever device the model runs on.
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device) * noise_std


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"invalid steering mode {mode!r}. Use one of {MODES}.")


def _check_lambda_s(lambda_s: float) -> None:
    if not math.isfinite(lambda_s):
        raise ValueError(f"invalid lambda_s {lambda_s}. The soft-steering strength must be a finite number.")


def _check_experts(experts: Sequence[int], *, num_experts: int, top_k: int, where: str) -> list[int]:
    """Validate the expert ids of one layer and return them as a list of ints, in the given order."""
    if top_k < 1:
        raise ValueError(f"invalid top_k {top_k}. A router selects at least 1 expert per token.")
    try:
        ids = [operator.index(expert) for expert in experts]
    except TypeError as error:
        raise ValueError(f"expert ids of {where} must be integers, got {list(experts)!r}.") from error
    if len(ids) > top_k:
        raise ValueError(
            f"{len(ids)} experts to steer in {where}, but the router selects only top_k = {top_k}, so "
            f"they cannot all be forced into the top-k. Lower routing.experts.max_per_layer (at most "
            f"{top_k}) or raise routing.experts.tau so that at most {top_k} task experts are kept per layer."
        )
    out_of_range = [expert for expert in ids if not 0 <= expert < num_experts]
    if out_of_range:
        raise ValueError(
            f"expert ids {out_of_range} of {where} are out of range: the router has {num_experts} experts, "
            f"ids 0..{num_experts - 1}."
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"expert ids of {where} repeat: {ids}. List each expert once.")
    return ids


class RoutingSteering:
    """Context manager that steers the routers of the given layers toward their task experts.

    ``experts_by_layer`` maps a decoder layer index (as in ``MoELayout.router_modules``) to the
    expert ids to steer there. Layers with an empty list are skipped. Inside the ``with`` block
    each steered router returns ``(steered_logits, top_k_weights, top_k_ids)``: the ids and
    weights follow the family's selection rule on the steered logits and keep the dtypes of the
    router's own output. The steered logits are float32 for every family.

    The hard-mode noise comes from a CPU generator seeded with ``seed`` on every entry, so two
    ``with`` blocks over the same inputs route identically.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        experts_by_layer: Mapping[int, Sequence[int]],
        *,
        mode: str = "soft",
        lambda_s: float = DEFAULT_LAMBDA_S,
        seed: int = 0,
        layout: MoELayout | None = None,
    ):
        _check_mode(mode)
        _check_lambda_s(lambda_s)
        self.model = model
        self.layout = layout if layout is not None else describe_moe(model)
        self.mode = mode
        self.lambda_s = float(lambda_s)
        self.seed = int(seed)

        modules = dict(model.named_modules())
        self.experts_by_layer: dict[int, list[int]] = {}
        self._routers: dict[int, torch.nn.Module] = {}
        for layer, experts in sorted(experts_by_layer.items()):
            layer = operator.index(layer)
            if layer not in self.layout.router_modules:
                raise ValueError(
                    f"layer {layer} is not a MoE layer of {self.layout.family!r}, so it has no router to steer. "
                    f"MoE layers: {self.layout.moe_layers}."
                )
            ids = _check_experts(
                experts, num_experts=self.layout.num_experts, top_k=self.layout.top_k, where=f"layer {layer}"
            )
            if not ids:
                continue
            name = self.layout.router_modules[layer]
            if name not in modules:
                raise ValueError(
                    f"router module {name!r} of layer {layer} is not found in {type(model).__name__}. "
                    "Build the layout with describe_moe(model) on this model."
                )
            self.experts_by_layer[layer] = sorted(ids)
            self._routers[layer] = modules[name]

        self._generator: torch.Generator | None = None
        # layer -> the router's instance `forward` before entering, or _NO_INSTANCE_FORWARD.
        self._saved_forwards: dict[int, Any] = {}

    def __enter__(self) -> RoutingSteering:
        if self._saved_forwards:
            raise RuntimeError("this RoutingSteering is already active. Exit it before entering it again.")
        if self.layout.selection == SELECTION_SPARSEMIXER and self.model.training:
            raise RuntimeError(
                f"{self.layout.family!r} samples its experts in training mode, which the steered top-k does not "
                "reproduce. Routing Steering is an inference method: call model.eval() first."
            )
        if self.layout.selection == SELECTION_GROUPED_SIGMOID and self.mode == "hard":
            # DeepSeek-V3 selects on sigmoid(z) plus a per-expert correction bias, inside the best
            # groups only, so a logit set to max(z) need not enter the top-k.
            log.warning(
                "hard routing steering on %r: the correction bias and group-limited selection can still "
                "leave a steered expert out of the top-k",
                self.layout.family,
            )

        self._generator = torch.Generator().manual_seed(self.seed)
        try:
            for layer, router in self._routers.items():
                self._saved_forwards[layer] = router.__dict__.get("forward", _NO_INSTANCE_FORWARD)
                router.forward = self._make_forward(router, router.forward, self.experts_by_layer[layer])
        except BaseException:
            self._restore_forwards()
            raise
        log.info(
            "routing steering (%s%s) on %d layers of %s: %s",
            self.mode,
            f", lambda_s={self.lambda_s:g}" if self.mode == "soft" else "",
            len(self._routers),
            self.layout.family,
            self.experts_by_layer,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore_forwards()
        self._generator = None

    def _restore_forwards(self) -> None:
        for layer, saved in self._saved_forwards.items():
            router = self._routers[layer]
            if saved is _NO_INSTANCE_FORWARD:
                router.__dict__.pop("forward", None)
            else:
                router.forward = saved
        self._saved_forwards.clear()

    def _make_forward(
        self, router: torch.nn.Module, original_forward: Callable[..., Any], experts: list[int]
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        layout = self.layout

        def steered_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            output = original_forward(*args, **kwargs)
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(
                    f"the {layout.family!r} router returned {type(output).__name__}, but steering expects the "
                    "tuple (router_logits, top_k_weights, top_k_ids) of the transformers 5.x routers."
                )
            logits, weights, ids = output
            steered = steer_logits(
                logits.reshape(-1, layout.num_experts),  # (tokens, E)
                experts,
                mode=self.mode,
                lambda_s=self.lambda_s,
                top_k=layout.top_k,
                generator=self._generator,
            )
            steered_ids, steered_weights = select_top_k(steered, layout, router)  # each (tokens, top_k)
            # The logits stay float32 instead of the router's dtype (bfloat16 for most families).
            # Rounding max(z) + eps back to bfloat16 would tie a forced expert with the argmax, and
            # hooks that recompute the top-k from these logits (RouterCapture) could then report a
            # selection that differs from the one the experts received.
            return (
                steered.reshape(logits.shape),
                steered_weights.to(weights.dtype).reshape(weights.shape),
                steered_ids.to(ids.dtype).reshape(ids.shape),
            )

        return steered_forward


def steering_experts(mask: Mapping) -> dict[int, list[int]]:
    """Select the task experts of the alignment-zone layers from an expert mask.

    ``mask`` is the JSON object that ``ramoe.routing.run.write_task_experts`` writes per task:
    ``layers`` maps str(layer) to its task experts and ``zone`` contains the inclusive
    ``first_layer`` and ``last_layer``. Returns ``{layer: sorted experts}`` for the zone layers
    with at least one task expert.
    """
    missing = [key for key in ("layers", "zone") if key not in mask]
    if missing:
        raise ValueError(
            f"expert mask is missing {missing}. Its keys are {sorted(mask)}. Use a mask written by the "
            "task-experts step of the workflow, which stores 'layers' and 'zone'."
        )
    zone = mask["zone"]
    missing = [key for key in ("first_layer", "last_layer") if key not in zone]
    if missing:
        raise ValueError(f"expert mask zone is missing {missing}. The zone is {dict(zone)}.")
    first, last = int(zone["first_layer"]), int(zone["last_layer"])
    if first > last:
        raise ValueError(f"invalid zone in the expert mask: first_layer {first} > last_layer {last}.")

    selected: dict[int, list[int]] = {}
    for key, experts in mask["layers"].items():
        layer = int(key)
        if first <= layer <= last and experts:
            selected[layer] = sorted(int(expert) for expert in experts)
    selected = dict(sorted(selected.items()))

    task = mask.get("task", "?")
    if selected:
        log.info("task %s: steering %d experts over %d zone layers %d..%d", task,
                 sum(len(experts) for experts in selected.values()), len(selected), first, last)
    else:
        log.warning("task %s: no task expert lies in the zone layers %d..%d, so routing steering changes nothing",
                    task, first, last)
    return selected
