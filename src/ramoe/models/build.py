"""Configs of the tiny MoE models that the workflow pretrains itself."""

from __future__ import annotations

from collections.abc import Mapping

from transformers import OlmoeConfig, PretrainedConfig, Qwen3MoeConfig

FAMILIES = ("olmoe", "qwen3_moe")


def tiny_moe_config(arch: Mapping, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PretrainedConfig:
    """Build the transformers config of a tiny MoE from the ``model.pretrain.architecture`` section.

    ``output_router_logits`` stays off in the saved config: with it on, transformers 5.25 also
    computes the load-balancing loss inside ``generate``, where it fails on the attention mask of
    a cached step. Training passes ``output_router_logits=True`` to each forward instead.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=arch["hidden_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        num_experts=arch["num_experts"],
        num_experts_per_tok=arch["top_k"],
        max_position_embeddings=arch["max_position_embeddings"],
        router_aux_loss_coef=arch["router_aux_loss_coef"],
        output_router_logits=False,
        tie_word_embeddings=True,
        # OlmoeConfig defaults eos_token_id=50279, outside a small vocabulary.
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    family = arch["family"]
    if family == "olmoe":
        return OlmoeConfig(intermediate_size=arch["expert_size"], **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            moe_intermediate_size=arch["expert_size"],
            intermediate_size=arch["expert_size"],
            head_dim=arch["hidden_size"] // arch["num_attention_heads"],
            norm_topk_prob=True,
            **common,
        )
    raise ValueError(f"model.pretrain.architecture.family {family!r} is not one of {FAMILIES}.")
