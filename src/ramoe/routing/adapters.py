"""MoE layout discovery and per-family expert selection for transformers 5.x models.

``describe_moe`` finds the router of every MoE decoder layer by walking the module tree and
reads the expert count, top-k and scoring from ``model.config``. ``select_top_k`` recomputes
a router's top-k experts from its logits in float32, following the family's own router code
in transformers 5.25 (``transformers/models/<family>/modeling_<family>.py``).

Supported families, keyed by ``config.model_type``:

==============  ========================  ==================  =======  ==========================
model_type      router module in a layer  expert-count field  scoring  top-k rule
==============  ========================  ==================  =======  ==========================
olmoe           mlp.gate                  num_experts         softmax  softmax, top-k, optional
                                                                       renormalisation
                                                                       (norm_topk_prob)
qwen2_moe       mlp.gate                  num_experts         softmax  as olmoe
qwen3_moe       mlp.gate                  num_experts or      softmax  as olmoe
                                          num_local_experts
mixtral         mlp.gate                  num_local_experts   softmax  softmax, top-k, always
                                                                       renormalised
phimoe          mlp.router                num_local_experts   softmax  sparsemixer (top-2 only)
granitemoe      block_sparse_moe.router   num_local_experts   softmax  top-k logits, softmax over
                                                                       the k
gpt_oss         mlp.router                num_local_experts   softmax  as granitemoe
deepseek_v3     mlp.gate                  n_routed_experts    sigmoid  group-limited top-k with
                                                                       correction bias
==============  ========================  ==================  =======  ==========================
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import __version__ as transformers_version

log = logging.getLogger(__name__)

SCORING_SOFTMAX = "softmax"
SCORING_SIGMOID = "sigmoid"

# Top-k rules understood by select_top_k.
SELECTION_SOFTMAX_TOP_K = "softmax_top_k"
SELECTION_TOP_K_SOFTMAX = "top_k_softmax"
SELECTION_SPARSEMIXER = "sparsemixer"
SELECTION_GROUPED_SIGMOID = "grouped_sigmoid"

# Config fields that hold the number of routed experts, in the order they are tried for a
# model_type that is not in the family table.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")

# Matches a module inside a decoder layer, e.g. "model.layers.3.mlp.gate". Group 1 is the layer
# index and group 2 the module path inside the layer.
_LAYER_MODULE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MoELayout:
    """Router locations of an MoE model, with its family's expert scoring and top-k selection rule."""

    family: str
    num_experts: int
    top_k: int
    num_layers: int
    router_modules: dict[int, str]
    scoring: str
    selection: str = SELECTION_SOFTMAX_TOP_K
    selection_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def moe_layers(self) -> list[int]:
        """Decoder layer indices that have a router, in ascending order. Dense layers are absent."""
        return sorted(self.router_modules)


class NoMoELayersError(ValueError):
    """Raised when a model has no router module, for example a dense Llama."""


class UnsupportedMoEModelError(ValueError):
    """Raised when a model declares experts in its config but none of its routers is recognised."""


@dataclass(frozen=True)
class _FamilyRouting:
    router_path: str
    expert_count_fields: tuple[str, ...]
    scoring: str
    selection: str
    read_options: Callable[[Any], dict[str, Any]]


def _norm_topk_prob_options(config: Any) -> dict[str, Any]:
    return {"normalize": bool(getattr(config, "norm_topk_prob", False))}


def _always_normalize_options(config: Any) -> dict[str, Any]:
    return {"normalize": True}


def _no_options(config: Any) -> dict[str, Any]:
    return {}


def _sparsemixer_options(config: Any) -> dict[str, Any]:
    return {"jitter_eps": float(config.router_jitter_noise)}


def _grouped_sigmoid_options(config: Any) -> dict[str, Any]:
    return {
        "n_group": int(config.n_group),
        "topk_group": int(config.topk_group),
        "normalize": bool(config.norm_topk_prob),
        "scaling": float(config.routed_scaling_factor),
    }


FAMILIES: dict[str, _FamilyRouting] = {
    "olmoe": _FamilyRouting(
        "mlp.gate", ("num_experts",), SCORING_SOFTMAX, SELECTION_SOFTMAX_TOP_K, _norm_topk_prob_options
    ),
    "qwen2_moe": _FamilyRouting(
        "mlp.gate", ("num_experts",), SCORING_SOFTMAX, SELECTION_SOFTMAX_TOP_K, _norm_topk_prob_options
    ),
    "qwen3_moe": _FamilyRouting(
        "mlp.gate",
        ("num_experts", "num_local_experts"),
        SCORING_SOFTMAX,
        SELECTION_SOFTMAX_TOP_K,
        _norm_topk_prob_options,
    ),
    "mixtral": _FamilyRouting(
        "mlp.gate", ("num_local_experts",), SCORING_SOFTMAX, SELECTION_SOFTMAX_TOP_K, _always_normalize_options
    ),
    "phimoe": _FamilyRouting(
        "mlp.router", ("num_local_experts",), SCORING_SOFTMAX, SELECTION_SPARSEMIXER, _sparsemixer_options
    ),
    "granitemoe": _FamilyRouting(
        "block_sparse_moe.router", ("num_local_experts",), SCORING_SOFTMAX, SELECTION_TOP_K_SOFTMAX, _no_options
    ),
    "gpt_oss": _FamilyRouting(
        "mlp.router", ("num_local_experts",), SCORING_SOFTMAX, SELECTION_TOP_K_SOFTMAX, _no_options
    ),
    "deepseek_v3": _FamilyRouting(
        "mlp.gate", ("n_routed_experts",), SCORING_SIGMOID, SELECTION_GROUPED_SIGMOID, _grouped_sigmoid_options
    ),
}


def describe_moe(model: torch.nn.Module) -> MoELayout:
    """Locate the router of every MoE layer of ``model`` and read its routing settings from the config.

    Raises NoMoELayersError when the module tree has no router, UnsupportedMoEModelError when
    the config declares experts but no router module is recognised, and ValueError when the
    config and the routers disagree.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`. Pass a transformers PreTrainedModel.")
    family = config.model_type
    text_config = config.get_text_config()
    supported = ", ".join(sorted(FAMILIES))

    routing = FAMILIES.get(family)
    if routing is not None:
        router_modules = _find_routers_by_path(model, routing.router_path)
        count_fields = routing.expert_count_fields
    else:
        router_modules = _find_routers_by_class_name(model)
        count_fields = EXPERT_COUNT_FIELDS

    if not router_modules:
        if routing is None and _read_expert_count(text_config, count_fields) is not None:
            raise UnsupportedMoEModelError(
                f"model_type {family!r} ({type(model).__name__}) declares experts in its config, but no "
                f"router module was recognised in its module tree. Supported model types: {supported}."
            )
        raise NoMoELayersError(
            f"{type(model).__name__} (model_type {family!r}) has no MoE layers: no router modules were found "
            f"in its module tree. Supported model types: {supported}."
        )

    num_experts = _read_expert_count(text_config, count_fields)
    if num_experts is None:
        raise ValueError(
            f"model_type {family!r}: config has none of the expert-count fields {list(count_fields)}."
        )
    top_k = getattr(text_config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
        raise ValueError(
            f"model_type {family!r}: config.num_experts_per_tok is {top_k!r}, expected an int in [1, {num_experts}]."
        )
    num_layers = int(text_config.num_hidden_layers)
    _check_routers(model, router_modules, num_experts, num_layers)

    if routing is not None:
        scoring = routing.scoring
        selection = routing.selection
        options = routing.read_options(text_config)
    else:
        # NOTE: for a model_type outside FAMILIES, softmax scoring and softmax top-k (renormalised
        # when config.norm_topk_prob is set) are assumed. That matches the Mixtral-style routers
        # but not, for example, sigmoid or group-limited routers.
        log.warning(
            "model_type %r is not in the supported families (%s), so softmax scoring and softmax top-k "
            "are assumed for its %d routers",
            family,
            supported,
            len(router_modules),
        )
        scoring = SCORING_SOFTMAX
        selection = SELECTION_SOFTMAX_TOP_K
        options = _norm_topk_prob_options(text_config)
    _check_selection(family, selection, options, num_experts, top_k)

    layout = MoELayout(
        family=family,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=num_layers,
        router_modules=router_modules,
        scoring=scoring,
        selection=selection,
        selection_options=options,
    )
    log.debug(
        "%s: %d MoE layers of %d (%s), %d experts, top-%d, %s scoring",
        family,
        len(router_modules),
        num_layers,
        layout.moe_layers,
        num_experts,
        top_k,
        scoring,
    )
    return layout


def describe_checkpoint(folder: str | Path) -> MoELayout:
    """Describe the MoE layout of a checkpoint folder from its config.json, without loading weights.

    The model is built on the meta device, so no memory is allocated for its parameters and a
    dense or unknown model is rejected in seconds. Raises UnsupportedMoEModelError when
    transformers has no causal-LM class for the config's model_type, and describe_moe's errors otherwise.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_path = Path(folder) / "config.json"
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise UnsupportedMoEModelError(f"{config_path} is not a readable JSON object ({error}).") from error
    supported = ", ".join(sorted(FAMILIES))
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedMoEModelError(
            f"{config_path} has model_type {model_type!r}, which transformers {transformers_version} does not "
            f"know. Supported MoE model types: {supported}."
        )
    config = AutoConfig.from_pretrained(folder)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise UnsupportedMoEModelError(
            f"{config_path}: model_type {model_type!r} has no causal-LM class in transformers "
            f"{transformers_version} ({error}). Supported MoE model types: {supported}."
        ) from error
    return describe_moe(model)


def _find_routers_by_path(model: torch.nn.Module, router_path: str) -> dict[int, str]:
    routers: dict[int, str] = {}
    for name, _module in model.named_modules():
        match = _LAYER_MODULE_NAME.search(name)
        if match is not None and match.group(2) == router_path:
            _add_router(routers, int(match.group(1)), name)
    return routers


def _find_routers_by_class_name(model: torch.nn.Module) -> dict[int, str]:
    """Collect modules whose class name ends in "Router" (e.g. ``MixtralTopKRouter``) inside decoder layers."""
    routers: dict[int, str] = {}
    for name, module in model.named_modules():
        match = _LAYER_MODULE_NAME.search(name)
        if match is not None and type(module).__name__.lower().endswith("router"):
            _add_router(routers, int(match.group(1)), name)
    return routers


def _add_router(routers: dict[int, str], layer: int, name: str) -> None:
    if layer in routers:
        raise ValueError(
            f"decoder layer {layer} has two router modules, {routers[layer]!r} and {name!r}. "
            "Models with several layer stacks or several routers per layer are not supported."
        )
    routers[layer] = name


def _read_expert_count(config: Any, fields: tuple[str, ...]) -> int | None:
    for name in fields:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_routers(model: torch.nn.Module, routers: dict[int, str], num_experts: int, num_layers: int) -> None:
    modules = dict(model.named_modules())
    for layer, name in routers.items():
        if layer >= num_layers:
            raise ValueError(f"router {name!r} is in layer {layer}, but config.num_hidden_layers is {num_layers}.")
        weight = getattr(modules[name], "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape[0] != num_experts:
            raise ValueError(
                f"router {name!r} has {weight.shape[0]} output rows, but the config declares {num_experts} experts."
            )


def _check_selection(
    family: str, selection: str, options: Mapping[str, Any], num_experts: int, top_k: int
) -> None:
    if selection == SELECTION_SPARSEMIXER and top_k != 2:
        raise ValueError(
            f"model_type {family!r}: the sparsemixer router always selects 2 experts, "
            f"but config.num_experts_per_tok is {top_k}."
        )
    if selection == SELECTION_GROUPED_SIGMOID:
        n_group = options["n_group"]
        if num_experts % n_group != 0:
            raise ValueError(f"model_type {family!r}: {num_experts} experts do not split into n_group={n_group}.")
        if not 0 < options["topk_group"] <= n_group:
            raise ValueError(
                f"model_type {family!r}: topk_group={options['topk_group']} must be in [1, n_group={n_group}]."
            )


def select_top_k(
    logits: torch.Tensor,
    layout: MoELayout,
    router: torch.nn.Module | None = None,
    *,
    softmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute the router's top-k expert ids and weights from (tokens, experts) logits.

    Works in float32 whatever the dtype of ``logits``. Returns ``(ids, weights)``, each
    (tokens, top_k), in the order the family's router produces them, which is unsorted for
    ``grouped_sigmoid``. ``router`` is the router module; ``grouped_sigmoid`` reads its
    ``e_score_correction_bias`` buffer, the other rules ignore it. ``softmax``, the float32
    softmax of ``logits`` when the caller has it already, saves computing it again for
    ``softmax_top_k``; the other rules ignore it.
    """
    logits = logits.float()
    options = layout.selection_options
    if layout.selection == SELECTION_SOFTMAX_TOP_K:
        if softmax is None:
            softmax = torch.softmax(logits, dim=-1)
        return _softmax_top_k(softmax, layout.top_k, normalize=options.get("normalize", False))
    if layout.selection == SELECTION_TOP_K_SOFTMAX:
        return _top_k_softmax(logits, layout.top_k)
    if layout.selection == SELECTION_SPARSEMIXER:
        return _sparsemixer_top_2(logits, jitter_eps=options["jitter_eps"])
    if layout.selection == SELECTION_GROUPED_SIGMOID:
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is None:
            raise ValueError(
                f"model_type {layout.family!r}: the grouped_sigmoid rule needs the router's "
                "e_score_correction_bias buffer, but it is missing. Pass the router module."
            )
        return _grouped_sigmoid_top_k(logits, layout.top_k, bias, options)
    raise ValueError(f"invalid selection rule {layout.selection!r} in the layout of {layout.family!r}.")


def _softmax_top_k(softmax: torch.Tensor, top_k: int, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMoE, Qwen2-MoE, Qwen3-MoE and Mixtral: softmax over all experts, then top-k."""
    weights, ids = softmax.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def _top_k_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoE and GPT-OSS: top-k on the logits, then softmax over those k logits."""
    top_logits, ids = logits.topk(top_k, dim=-1)
    return ids, torch.softmax(top_logits, dim=-1)


def _sparsemixer_top_2(logits: torch.Tensor, *, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's ``sparsemixer`` in eval mode: the best expert, then the best of the rest.

    Each weight is a softmax over the experts whose logit lies within a relative ``2 * jitter_eps``
    of the chosen one, so the two weights need not sum to 1. In training mode PhiMoE samples the
    experts instead, which this function does not reproduce.
    """
    first_max, first_ids = logits.max(dim=-1, keepdim=True)
    first_weights = _sparsemixer_weight(logits, logits, first_max, first_ids, jitter_eps)

    without_first = logits.scatter(-1, first_ids, float("-inf"))
    second_max, second_ids = without_first.max(dim=-1, keepdim=True)
    second_weights = _sparsemixer_weight(without_first, logits, second_max, second_ids, jitter_eps)

    ids = torch.cat((first_ids, second_ids), dim=-1)
    weights = torch.cat((first_weights, second_weights), dim=-1)
    return ids, weights


def _sparsemixer_weight(
    candidates: torch.Tensor, logits: torch.Tensor, chosen_max: torch.Tensor, chosen_ids: torch.Tensor, jitter_eps: float
) -> torch.Tensor:
    with torch.no_grad():
        factor = logits.abs().clamp(min=chosen_max)
        too_far = ((chosen_max - logits) / factor) > (2 * jitter_eps)
    gates = torch.softmax(candidates.masked_fill(too_far, float("-inf")), dim=-1)
    return gates.gather(-1, chosen_ids)


def _grouped_sigmoid_top_k(
    logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor, options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores, group-limited selection on the bias-corrected scores.

    The correction bias only changes which experts are selected. The weights are the
    uncorrected sigmoid scores, renormalised when ``norm_topk_prob`` is set and multiplied by
    ``routed_scaling_factor``, as the router returns them.
    """
    scores = logits.sigmoid()
    choice_scores = scores + correction_bias.to(device=scores.device, dtype=torch.float32)
    num_tokens, num_experts = scores.shape
    n_group = options["n_group"]
    experts_per_group = num_experts // n_group

    # A group's score is the sum of its two best corrected scores. Only the best topk_group
    # groups stay eligible.
    group_scores = choice_scores.reshape(num_tokens, n_group, experts_per_group).topk(2, dim=-1).values.sum(dim=-1)
    group_ids = group_scores.topk(options["topk_group"], dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts_per_group).reshape(num_tokens, num_experts)
    choice_scores = choice_scores.masked_fill(~expert_mask, float("-inf"))

    ids = choice_scores.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if options["normalize"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * options["scaling"]
