"""Pretraining, checkpoint round trip offline, and batched inference on a tiny MoE."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ramoe.config import validate_config
from ramoe.evaluation.base import evaluate_examples
from ramoe.evaluation.inference import generate_greedy, score_choices, stop_token_ids
from ramoe.models.loading import load_model
from ramoe.models.tokenizer import build_byte_tokenizer, build_word_tokenizer
from ramoe.synthetic.world import World, WorldConfig
from ramoe.training.pretrain import get_lr, pretrain


@pytest.fixture(scope="module")
def tiny_world():
    from conftest import TINY_CONFIG
    from ramoe.config import load_config

    config = load_config(TINY_CONFIG)
    section = dict(config["data"]["synthetic"], tasks=["arith", "cause"], languages=config["data"]["synthetic"]["languages"][:2])
    return config, World(WorldConfig.from_config(section))


@pytest.fixture(scope="module")
def checkpoint(tiny_world, tmp_path_factory):
    config, world = tiny_world
    tokenizer = build_word_tokenizer(world.vocabulary())
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    settings = dict(config["model"]["pretrain"], steps=8)
    pretrain(world.pretraining_lines(), tokenizer, settings, folder)
    return folder


def test_checkpoint_folder_contents(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "pretrain_config.json"} <= names
    records = [json.loads(line) for line in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(r["lm_loss"] > 0 and r["aux_loss"] > 0 for r in records)
    provenance = json.loads((checkpoint / "pretrain_config.json").read_text())
    assert provenance["seed"] == 0
    assert provenance["versions"]["transformers"] == "5.25.0"


def test_no_temporary_folder_left(checkpoint):
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".tmp-")]


def test_round_trip_offline(checkpoint, tiny_world):
    """The folder loads with the Auto classes offline and reproduces the saved logits."""
    _, world = tiny_world
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    again = AutoModelForCausalLM.from_pretrained(checkpoint)
    prompt = world.task_rows("arith")[0]["prompt"]
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids["input_ids"][0].tolist()
    assert model.config.model_type == "olmoe"
    assert model.config.num_hidden_layers == 2
    assert tokenizer.padding_side == "left"
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True) == prompt


def test_hub_id_offline_fails_fast():
    with pytest.raises(RuntimeError, match="hub is offline"):
        load_model({"kind": "hub", "path": "allenai/OLMoE-1B-7B-0924", "revision": None, "dtype": "bfloat16"})


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model({"kind": "local", "path": str(tmp_path), "revision": None, "dtype": "float32"})


def test_batched_generation_matches_single(checkpoint, tiny_world):
    """Left padding and the KV cache give the same greedy outputs as one prompt at a time."""
    _, world = tiny_world
    model, tokenizer = load_model({"kind": "local", "path": str(checkpoint), "dtype": "float32"})
    prompts = [r["prompt"] for r in world.task_rows("arith")[:12]]
    batched = generate_greedy(model, tokenizer, prompts, batch_size=12, max_new_tokens=3)
    single = [generate_greedy(model, tokenizer, [p], batch_size=1, max_new_tokens=3)[0] for p in prompts]
    assert batched == single


def test_choice_scores_hand_computed(checkpoint):
    """The score of a choice is the sum of its tokens' log-probabilities given the prompt."""
    model, tokenizer = load_model({"kind": "local", "path": str(checkpoint), "dtype": "float32"})
    prompt, choice = "tom is hungry . so", " tom eats bread ."
    context = tokenizer(prompt)["input_ids"]
    continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = sum(float(log_probs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    scores = score_choices(model, tokenizer, [prompt, prompt], [[choice, " tom sheds tears ."], [choice]], batch_size=2)
    assert scores[0][0] == pytest.approx(expected, abs=1e-4)
    assert scores[1][0] == pytest.approx(expected, abs=1e-4)
    mean = score_choices(model, tokenizer, [prompt], [[choice]], batch_size=1, normalization="mean")
    assert mean[0][0] == pytest.approx(expected / len(continuation), abs=1e-4)


def test_evaluate_examples_columns(checkpoint, tiny_world):
    _, world = tiny_world
    model, tokenizer = load_model({"kind": "local", "path": str(checkpoint), "dtype": "float32"})
    rows = [r for r in world.task_rows("arith") if r["lang"] == "en"][:5]
    settings = {"batch_size": 4, "max_new_tokens": 3, "choice_normalization": "sum"}
    frame = evaluate_examples(model, tokenizer, rows, settings, model_name="m", method="base", seed=0)
    assert frame.columns == [
        "model", "method", "seed", "task", "lang", "split", "item_id", "prompt", "raw_output",
        "parsed_answer", "gold", "parse_failure", "correct", "choice_scores", "score",
    ]
    for row in frame.iter_rows(named=True):
        assert row["parse_failure"] == (row["parsed_answer"] is None)
        assert row["correct"] == (row["parsed_answer"] == row["gold"])


def test_byte_tokenizer_covers_scripts():
    texts = ["Janet has 16 ducks.", "জেনেটের হাঁসগুলি ১৬টি ডিম পাড়ে।", "ジャネットのアヒルは", "Утки Джанет"]
    tokenizer = build_byte_tokenizer(texts * 5, vocab_size=300)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_lr_schedule():
    kwargs = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert get_lr(0, **kwargs) == pytest.approx(0.1)
    assert get_lr(9, **kwargs) == pytest.approx(1.0)
    assert get_lr(60, **kwargs) == pytest.approx(0.55)
    assert get_lr(110, **kwargs) == pytest.approx(0.1)


def test_router_parameter_group():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from ramoe.training.pretrain import parameter_groups

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = OlmoeForCausalLM(config)
    others, routers = parameter_groups(model, 10.0)
    router_ids = {id(p) for p in routers["params"]}
    expected = {id(model.model.layers[i].mlp.gate.weight) for i in range(2)}
    assert router_ids == expected
    assert routers["lr_scale"] == 10.0
    assert others["lr_scale"] == 1.0
    assert len(others["params"]) + len(routers["params"]) == len(list(model.parameters()))


def test_generation_stops_at_model_stop_token(checkpoint, tiny_world, monkeypatch):
    """A token in the model's generation config ends a reply like the tokenizer's EOS does."""
    _, world = tiny_world
    model, tokenizer = load_model({"kind": "local", "path": str(checkpoint), "dtype": "float32"})
    prompt = world.task_rows("arith")[0]["prompt"]
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        first_id = int(model(**encoded).logits[0, -1].argmax())
    original_generate = model.generate
    new_token_counts = []

    def counting_generate(**kwargs):
        sequences = original_generate(**kwargs)
        new_token_counts.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return sequences

    monkeypatch.setattr(model, "generate", counting_generate)
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    if first_id != tokenizer.eos_token_id:
        generate_greedy(model, tokenizer, [prompt], batch_size=1, max_new_tokens=3)
        assert new_token_counts.pop() > 1  # up to 3, unless the tokenizer's EOS comes first

    # The greedy first token becomes an end-of-turn token of the model: generation stops after it.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first_id]
    assert stop_token_ids(model, tokenizer) == list(dict.fromkeys([tokenizer.eos_token_id, first_id]))
    generate_greedy(model, tokenizer, [prompt], batch_size=1, max_new_tokens=3)
    assert new_token_counts.pop() == 1
