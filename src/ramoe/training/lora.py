"""LoRA adapters through PEFT on the attention projections, the routers and the fused expert tensors.

In transformers 5 the routed experts of an MoE layer are one module of 3-D tensors. For OLMoE
and Qwen3-MoE these are ``mlp.experts.gate_up_proj``, of shape (experts, 2 * expert_size,
hidden), and ``mlp.experts.down_proj``. The router (``mlp.gate``) is a plain module with a 2-D
``weight`` Parameter, not an ``nn.Linear``. PEFT 0.21.2 accepts a router in ``target_modules``
only for the model types of its transformers-4-to-5 conversion table (OLMoE, Qwen2/3-MoE and
Mixtral among them), where it rewrites ``gate`` to the parameter ``gate.weight``. This module
therefore names the routers and the expert tensors in ``target_parameters`` directly, which
works for every family that ``describe_moe`` supports. PEFT's ``ParamWrapper`` takes the
module's place, keeps the original as ``base_layer``, and adds ``scaling * B @ A`` to the
Parameter during each forward (one low-rank pair per expert for a 3-D tensor).

The wrapper takes the module's place under the same name, so ``describe_moe`` still finds the
router at ``model.layers.{i}.mlp.gate``, and the router hooks of ``RouterCapture`` see the
adapted logits with their graph: the RA-MoE alignment loss reaches the routers' LoRA factors.

``merge_lora`` folds every update into its base weight and puts the plain modules back, so the
saved checkpoint is an ordinary transformers checkpoint that evaluation loads without PEFT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, LoraModel

from ramoe.routing.adapters import MoELayout

log = logging.getLogger(__name__)

# Attribute of the model under which add_lora keeps the PEFT tuner that merge_lora needs. It is
# stored in the instance __dict__, not as a submodule, because the tuner contains the model.
_TUNER_ATTRIBUTE = "_ramoe_lora_tuner"
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraTargets:
    """Full names of what LoRA adapts: ``nn.Linear`` modules and Parameters of other modules."""

    modules: list[str]
    parameters: list[str]


def find_targets(model: torch.nn.Module, layout: MoELayout, options: Mapping) -> LoraTargets:
    """Resolve the ``finetune.lora`` choices to full module and parameter names of ``model``.

    ``attention_modules`` names ``nn.Linear`` modules inside each decoder layer's ``self_attn``,
    ``routers`` adds the ``weight`` of every router that ``describe_moe`` found, and
    ``expert_parameters`` names Parameters of the ``experts`` module next to each router.
    Raises ValueError naming the first choice that matches nothing.
    """
    modules = dict(model.named_modules())
    router_names = [layout.router_modules[layer] for layer in layout.moe_layers]
    blocks = [name.rsplit(".", 1)[0] for name in router_names]  # e.g. model.layers.3.mlp

    attention = []
    for short_name in options.get("attention_modules", []):
        found = sorted(
            name for name, module in modules.items()
            if name.endswith(f".self_attn.{short_name}") and isinstance(module, torch.nn.Linear)
        )
        if not found:
            raise ValueError(
                f"finetune.lora.attention_modules: no nn.Linear named self_attn.{short_name} in "
                f"{type(model).__name__}. Use the names of its attention projections (e.g. q_proj, k_proj, v_proj, o_proj)."
            )
        attention.extend(found)

    parameters = [f"{name}.weight" for name in router_names] if options.get("routers", True) else []
    for short_name in options.get("expert_parameters", []):
        for block in blocks:
            experts = modules.get(f"{block}.experts")
            if experts is None or not isinstance(getattr(experts, short_name, None), torch.nn.Parameter):
                available = [] if experts is None else [n for n, _ in experts.named_parameters(recurse=False)]
                raise ValueError(
                    f"finetune.lora.expert_parameters: {block}.experts has no Parameter {short_name!r} "
                    f"(it has {available}). Name the fused expert tensors of {layout.family} "
                    "(gate_up_proj and down_proj for OLMoE, Qwen3-MoE, Mixtral and GPT-OSS)."
                )
            parameters.append(f"{block}.experts.{short_name}")
    if not attention and not parameters:
        raise ValueError("finetune.lora targets nothing. Set attention_modules, routers or expert_parameters.")
    return LoraTargets(modules=attention, parameters=parameters)


def add_lora(model: torch.nn.Module, layout: MoELayout, options: Mapping) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters into ``model`` in place, freeze every base weight and return the LoRA factors.

    ``options`` is the ``finetune.lora`` section: ``r``, ``alpha`` (update scale alpha / r),
    ``dropout`` and the targets read by ``find_targets``. PEFT initialises B to zero, so the
    adapted model starts equal to the base model, and on the first optimizer step only the B
    factors receive a gradient.
    """
    targets = find_targets(model, layout, options)
    if options.get("dropout", 0.0) and targets.parameters:
        # PEFT 0.21's ParamWrapper raises for lora_dropout != 0 because dropout of the input
        # cannot be applied inside a weight update.
        raise ValueError(
            f"finetune.lora.dropout = {options['dropout']} cannot be used with routers or expert_parameters "
            "(PEFT applies those adapters to the weight, where input dropout is undefined). Set dropout: 0."
        )
    config = LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options.get("dropout", 0.0),
        target_modules=targets.modules,
        target_parameters=targets.parameters or None,
        bias="none",
    )
    tuner = LoraModel(model, config, ADAPTER_NAME)
    model.__dict__[_TUNER_ATTRIBUTE] = tuner
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    log.info(
        "LoRA r=%d alpha=%g on %d attention projections and %d router or expert Parameters: %d adapter tensors",
        options["r"], options["alpha"], len(targets.modules), len(targets.parameters), len(trainable),
    )
    return trainable


def has_lora(model: torch.nn.Module) -> bool:
    """Return True when ``add_lora`` injected adapters into ``model`` that are not merged yet."""
    return _TUNER_ATTRIBUTE in model.__dict__


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA update into its base weight and remove the adapter modules, in place.

    Returns ``model`` with its original module tree, so ``save_pretrained`` writes a plain
    transformers checkpoint. ``safe_merge`` makes PEFT check the merged weights for NaN.
    """
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters from add_lora to merge.")
    tuner = model.__dict__.pop(_TUNER_ATTRIBUTE)
    merged = tuner.merge_and_unload(safe_merge=True)
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged
