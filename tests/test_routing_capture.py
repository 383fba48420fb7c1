"""Router capture on tiny random models of every supported MoE family (transformers 5.25, CPU)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from ramoe.routing import MoELayout, NoMoELayersError, RouterCapture, describe_moe, per_sequence
from ramoe.routing.adapters import UnsupportedMoEModelError

VOCAB_SIZE = 64
PAD_ID = 0
COMMON_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)

# model_type -> (config class, extra config keys, expected MoE layers of 3, expected experts).
FAMILY_CASES = {
    "olmoe": (transformers.OlmoeConfig, dict(num_experts=8, num_experts_per_tok=2), [0, 1, 2], 8),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[1],
        ),
        [0, 2],
        8,
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8, norm_topk_prob=True),
        [0, 1, 2],
        6,
    ),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), [0, 1, 2], 4),
    "phimoe": (
        transformers.PhimoeConfig,
        # The default jitter (0.01) keeps a single expert in each sparsemixer softmax, so every
        # weight would be 1.
        dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.3),
        [0, 1, 2],
        8,
    ),
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_local_experts=8, num_experts_per_tok=2), [0, 1, 2], 8),
    "gpt_oss": (
        transformers.GptOssConfig,
        dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8),
        [0, 1, 2],
        8,
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        [1, 2],
        8,
    ),
}
FAMILIES = list(FAMILY_CASES)

# Families whose router returns its top-k sorted by weight, descending. PhiMoE orders by logit
# rank and DeepSeek-V3 returns an unsorted top-k.
ROUTER_SORTS_BY_WEIGHT = {"olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "granitemoe", "gpt_oss"}


def build_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            # A zero bias would leave DeepSeek-V3's selection-only bias untested.
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> tuple[str, transformers.PreTrainedModel]:
    config_class, extra, _, _ = FAMILY_CASES[request.param]
    return request.param, build_model(config_class(**COMMON_CONFIG, **extra))


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Return the unpadded sequences and their left-padded input ids and attention mask."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, VOCAB_SIZE, (length,), generator=generator) for length in lengths]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD_ID)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = sequence
        attention_mask[row, width - len(sequence) :] = 1
    return sequences, input_ids, attention_mask


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def routers_of(model: torch.nn.Module, layout: MoELayout) -> dict[int, torch.nn.Module]:
    modules = dict(model.named_modules())
    return {layer: modules[name] for layer, name in layout.router_modules.items()}


def test_describe_moe_layout(family_model):
    family, model = family_model
    config_class, _, expected_layers, expected_experts = FAMILY_CASES[family]

    layout = describe_moe(model)

    assert isinstance(model.config, config_class)
    assert layout.family == family
    assert layout.num_experts == expected_experts
    assert layout.top_k == 2
    assert layout.num_layers == 3
    assert layout.moe_layers == expected_layers
    for layer, name in layout.router_modules.items():
        assert name.startswith(f"model.layers.{layer}.")
    assert layout.scoring == ("sigmoid" if family == "deepseek_v3" else "softmax")


def test_hook_logits_match_output_router_logits(family_model):
    family, model = family_model
    layout = describe_moe(model)
    _, input_ids, attention_mask = left_padded_batch([5, 3])

    with RouterCapture(model, layout) as capture, torch.no_grad():
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            output_router_logits=True,
        )

    assert outputs.router_logits is not None
    assert len(outputs.router_logits) == len(layout.moe_layers)
    for returned, layer in zip(outputs.router_logits, layout.moe_layers, strict=True):
        assert len(capture.logits[layer]) == 1
        captured = capture.logits[layer][0]
        assert captured.dtype == torch.float32
        assert captured.shape == (input_ids.numel(), layout.num_experts)
        torch.testing.assert_close(captured, returned.float(), rtol=0, atol=0)


def test_top_k_matches_router_outputs(family_model):
    family, model = family_model
    layout = describe_moe(model)
    _, input_ids, attention_mask = left_padded_batch([6, 4], seed=1)

    router_outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer, router in routers_of(model, layout).items():

        def record(module, args, output, layer=layer):
            router_outputs[layer] = (output[2].detach().clone(), output[1].detach().float().clone())

        handles.append(router.register_forward_hook(record))
    try:
        with RouterCapture(model, layout) as capture, torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
    finally:
        for handle in handles:
            handle.remove()

    for layer in layout.moe_layers:
        ids, weights = capture.top_k(layer)
        router_ids, router_weights = router_outputs[layer]
        assert ids.shape == router_ids.shape == (input_ids.numel(), 2)
        assert weights.dtype == torch.float32
        assert torch.all(weights[:, 0] >= weights[:, 1])

        if family in ROUTER_SORTS_BY_WEIGHT:
            assert torch.equal(ids, router_ids)
            torch.testing.assert_close(weights, router_weights, rtol=1e-6, atol=1e-6)

        by_id = ids.argsort(dim=-1)
        router_by_id = router_ids.argsort(dim=-1)
        assert torch.equal(ids.gather(-1, by_id), router_ids.gather(-1, router_by_id))
        torch.testing.assert_close(
            weights.gather(-1, by_id), router_weights.gather(-1, router_by_id), rtol=1e-6, atol=1e-6
        )



def test_all_layers_matches_per_layer_methods(family_model):
    family, model = family_model
    layout = describe_moe(model)
    _, input_ids, attention_mask = left_padded_batch([7, 3, 5], seed=2)
    with RouterCapture(model, layout) as capture, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))

    def assert_matches_per_layer(capture: RouterCapture) -> None:
        probabilities, ids, weights = capture.all_layers(call=0)
        tokens, layers = input_ids.numel(), len(layout.moe_layers)
        assert probabilities.shape == (tokens, layers, layout.num_experts)
        assert ids.shape == weights.shape == (tokens, layers, layout.top_k)
        for index, layer in enumerate(layout.moe_layers):
            layer_ids, layer_weights = capture.top_k(layer, call=0)
            torch.testing.assert_close(probabilities[:, index], capture.probabilities(layer, call=0), rtol=0, atol=1e-7)
            assert torch.equal(ids[:, index], layer_ids), (family, layer)
            torch.testing.assert_close(weights[:, index], layer_weights, rtol=0, atol=1e-7)

    assert_matches_per_layer(capture)
    # Every router of these families returns its ids, which all_layers reuses for softmax_top_k.
    assert all(entry is not None for entries in capture.router_ids.values() for entry in entries), family
    if layout.selection == "softmax_top_k":
        # all_layers reads the routers' ids: swapped columns come back swapped.
        router_ids = capture.router_ids
        capture.router_ids = {layer: [entries[0].flip(-1)] for layer, entries in router_ids.items()}
        assert torch.equal(capture.all_layers(call=0)[1][:, 0], router_ids[layout.moe_layers[0]][0].flip(-1))
        # Without the routers' ids, all_layers recomputes the top-k, with the same result.
        capture.router_ids = {layer: [None] for layer in layout.moe_layers}
        assert_matches_per_layer(capture)

def test_padding_invariance(family_model):
    family, model = family_model
    layout = describe_moe(model)
    sequences, input_ids, attention_mask = left_padded_batch([7, 4, 2], seed=2)

    with RouterCapture(model, layout) as batched, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
    single_runs = []
    for sequence in sequences:
        with RouterCapture(model, layout) as single, torch.no_grad():
            model(input_ids=sequence.unsqueeze(0))
        single_runs.append(single)

    for layer in layout.moe_layers:
        rows = per_sequence(batched.probabilities(layer), attention_mask)
        assert [len(row) for row in rows] == [len(sequence) for sequence in sequences]
        for row, single in zip(rows, single_runs, strict=True):
            expected = single.probabilities(layer)
            torch.testing.assert_close(row, expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(row.sum(dim=-1), torch.ones(len(row)), rtol=0, atol=1e-5)


def test_capture_inside_generate(family_model):
    family, model = family_model
    layout = describe_moe(model)
    _, input_ids, attention_mask = left_padded_batch([5, 3], seed=3)
    batch, prompt_len = input_ids.shape
    new_tokens = 3

    with RouterCapture(model, layout) as generated, torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_ID,
        )
    assert sequences.shape == (batch, prompt_len + new_tokens)

    # A cache-free forward over the generated sequences routes the same tokens.
    full_mask = torch.cat((attention_mask, torch.ones((batch, new_tokens), dtype=attention_mask.dtype)), dim=1)
    with RouterCapture(model, layout) as full, torch.no_grad():
        model(input_ids=sequences, attention_mask=full_mask, position_ids=position_ids_for(full_mask))

    for layer in layout.moe_layers:
        entries = generated.logits[layer]
        assert len(entries) == new_tokens
        assert entries[0].shape == (batch * prompt_len, layout.num_experts)
        for step in range(1, new_tokens):
            assert entries[step].shape == (batch, layout.num_experts)

        full_rows = per_sequence(full.probabilities(layer), full_mask)
        prefill_rows = per_sequence(generated.probabilities(layer, call=0), attention_mask)
        for row in range(batch):
            prompt_tokens = int(attention_mask[row].sum())
            torch.testing.assert_close(prefill_rows[row], full_rows[row][:prompt_tokens], rtol=0, atol=1e-5)
            for step in range(1, new_tokens):
                step_probabilities = generated.probabilities(layer, call=step)[row]
                expected = full_rows[row][prompt_tokens + step - 1]
                torch.testing.assert_close(step_probabilities, expected, rtol=0, atol=1e-5)


def test_dense_llama_raises_no_moe_layers():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = build_model(config)

    with pytest.raises(NoMoELayersError, match="LlamaForCausalLM") as raised:
        describe_moe(model)
    assert "no router modules were found" in str(raised.value)


def test_all_dense_qwen2_moe_raises_no_moe_layers():
    extra = dict(FAMILY_CASES["qwen2_moe"][1], mlp_only_layers=[0, 1, 2])
    model = build_model(transformers.Qwen2MoeConfig(**COMMON_CONFIG, **extra))

    with pytest.raises(NoMoELayersError, match="Qwen2MoeForCausalLM"):
        describe_moe(model)


def test_unknown_family_with_top_k_router(caplog):
    # FlexOlmo is not in the family table, but its FlexOlmoTopKRouter is an OLMoE-style router.
    config = transformers.FlexOlmoConfig(**COMMON_CONFIG, num_experts=4, num_experts_per_tok=2)
    model = build_model(config)

    with caplog.at_level(logging.WARNING, logger="ramoe.routing.adapters"):
        layout = describe_moe(model)

    assert "flex_olmo" in caplog.text
    assert layout.moe_layers == [0, 1, 2]
    assert layout.num_experts == 4
    router_ids = {}
    handles = [
        router.register_forward_hook(lambda module, args, output, layer=layer: router_ids.update({layer: output[2]}))
        for layer, router in routers_of(model, layout).items()
    ]
    with RouterCapture(model, layout) as capture, torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB_SIZE, (1, 6), generator=torch.Generator().manual_seed(4)))
    for handle in handles:
        handle.remove()
    for layer in layout.moe_layers:
        assert torch.equal(capture.top_k(layer)[0], router_ids[layer])


def test_unknown_moe_without_router_raises():
    # JetMoE declares experts, but its router class (JetMoeTopKGating) is not recognised.
    config = transformers.JetMoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = build_model(config)

    with pytest.raises(UnsupportedMoEModelError, match="jetmoe"):
        describe_moe(model)


def test_keep_graph_reaches_router_weight(family_model):
    family, model = family_model
    layout = describe_moe(model)
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 5), generator=torch.Generator().manual_seed(5))
    model.zero_grad(set_to_none=True)

    with RouterCapture(model, layout, keep_graph=True) as capture:
        model(input_ids=input_ids)
    loss = sum(capture.probabilities(layer)[:, 0].sum() for layer in layout.moe_layers)
    loss.backward()

    for layer, router in routers_of(model, layout).items():
        assert router.weight.grad is not None, f"no gradient on the router of layer {layer}"
        assert router.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_detached_without_keep_graph(family_model):
    family, model = family_model
    layout = describe_moe(model)

    with RouterCapture(model, layout) as capture:
        model(input_ids=torch.randint(3, VOCAB_SIZE, (1, 4), generator=torch.Generator().manual_seed(6)))

    for layer in layout.moe_layers:
        assert not capture.logits[layer][0].requires_grad
    model.zero_grad(set_to_none=True)


def test_bfloat16_matches_float32_top_k(family_model):
    family, model = family_model
    layout = describe_moe(model)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    input_ids = torch.randint(3, VOCAB_SIZE, (4, 16), generator=torch.Generator().manual_seed(7))

    with RouterCapture(model, layout) as float32_capture, torch.no_grad():
        model(input_ids=input_ids)
    with RouterCapture(model_bf16, layout) as bfloat16_capture, torch.no_grad():
        model_bf16(input_ids=input_ids)

    for layer in layout.moe_layers:
        assert bfloat16_capture.logits[layer][0].dtype == torch.float32
        probabilities = bfloat16_capture.probabilities(layer)
        assert probabilities.dtype == torch.float32
        torch.testing.assert_close(probabilities.sum(dim=-1), torch.ones(len(probabilities)), rtol=0, atol=1e-6)

        # The margin is on raw logits. DeepSeek-V3 also selects by group scores and the correction
        # bias, whose near-ties this margin does not exclude.
        sorted_logits = float32_capture.logits[layer][0].sort(dim=-1, descending=True).values
        decisive = (sorted_logits[:, layout.top_k - 1] - sorted_logits[:, layout.top_k]) > 1e-2
        assert decisive.float().mean() > 0.5, "too few tokens above the near-tie margin to compare"
        float32_ids = float32_capture.top_k(layer)[0].sort(dim=-1).values
        bfloat16_ids = bfloat16_capture.top_k(layer)[0].sort(dim=-1).values
        assert torch.equal(float32_ids[decisive], bfloat16_ids[decisive])


def test_capture_errors(family_model):
    family, model = family_model
    layout = describe_moe(model)
    capture = RouterCapture(model, layout)

    with pytest.raises(LookupError, match="no router logits captured"):
        capture.probabilities(layout.moe_layers[0])
    with pytest.raises(KeyError, match="has no router"):
        capture.probabilities(layout.num_layers)
    with capture:
        with pytest.raises(RuntimeError, match="already active"):
            capture.__enter__()
    with pytest.raises(ValueError, match="single forward call"):
        per_sequence(torch.zeros(5, 4), torch.ones(2, 3))


def test_hooks_removed_on_exit(family_model):
    family, model = family_model
    layout = describe_moe(model)
    input_ids = torch.randint(3, VOCAB_SIZE, (1, 4), generator=torch.Generator().manual_seed(8))

    with RouterCapture(model, layout) as capture, torch.no_grad():
        model(input_ids=input_ids)
    with torch.no_grad():
        model(input_ids=input_ids)
    assert all(len(entries) == 1 for entries in capture.logits.values())

    capture.clear()
    assert all(len(entries) == 0 for entries in capture.logits.values())
