"""Config validation: the shipped configs pass, misspelt keys and bad values are rejected by name."""

import copy

import pytest
import yaml

from ramoe.config import ConfigError, load_config, validate_config
from conftest import REPO, TINY_CONFIG


@pytest.mark.parametrize("path", [REPO / "config.yaml", TINY_CONFIG], ids=lambda p: p.name)
def test_shipped_config_valid(path):
    config = load_config(path)
    assert config["model"]["source"] == "pretrain"


def test_defaults_filled(tiny_config):
    assert "bitext_share" not in tiny_config["data"]["synthetic"]["languages"][0]
    config = validate_config(tiny_config)
    assert config["data"]["synthetic"]["languages"][0]["bitext_share"] == 0.05


def test_misspelt_key_rejected(tiny_config):
    tiny_config["data"]["synthetic"]["itmes_per_task"] = tiny_config["data"]["synthetic"].pop("items_per_task")
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config)
    assert "data.synthetic.itmes_per_task" in str(error.value)
    assert "Did you mean 'items_per_task'" in str(error.value)


def test_misspelt_top_level_key(tiny_config):
    tiny_config["evalution"] = tiny_config.pop("evaluation")
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config)
    assert "'evalution'" in str(error.value)


@pytest.mark.parametrize(
    ("keys", "value", "expected"),
    [
        (("model", "pretrain", "steps"), 0, "model.pretrain.steps = 0 is out of range: must be >= 1"),
        (("data", "synthetic", "test_fraction"), 1.0, "data.synthetic.test_fraction = 1.0 is out of range: must be < 1"),
        (("evaluation", "choice_normalization"), "max", "evaluation.choice_normalization = 'max' is invalid"),
        (("model", "pretrain", "architecture", "family"), "llama", "model.pretrain.architecture.family = 'llama'"),
        (("model", "pretrain", "lr"), -1e-3, "model.pretrain.lr = -0.001 is out of range"),
    ],
)
def test_out_of_range_value(tiny_config, keys, value, expected):
    node = tiny_config
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config)
    assert expected in str(error.value)


def test_undefined_language_rejected(tiny_config):
    tiny_config["target_languages"] = ["xa", "zz"]
    with pytest.raises(ConfigError, match=r"target languages \['zz'\] have no definition"):
        validate_config(tiny_config)


def test_english_not_a_target(tiny_config):
    tiny_config["target_languages"] = ["en", "xa"]
    with pytest.raises(ConfigError, match=r"target_languages\[0\]"):
        validate_config(tiny_config)


def test_top_k_above_experts(tiny_config):
    tiny_config["model"]["pretrain"]["architecture"]["top_k"] = 8
    with pytest.raises(ConfigError, match="top_k = 8 exceeds num_experts = 4"):
        validate_config(tiny_config)


def test_task_of_other_source(tiny_config):
    tiny_config["tasks"] = ["arith", "mgsm"]
    with pytest.raises(ConfigError, match=r"tasks \['mgsm'\] are not available with data.source = 'synthetic'"):
        validate_config(tiny_config)


def test_input_not_mutated(tiny_config):
    before = copy.deepcopy(tiny_config)
    validate_config(tiny_config)
    assert tiny_config == before


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_task_languages_override(tiny_config):
    from ramoe.config import task_languages

    tiny_config["task_languages"] = {"cause": ["xb"]}
    config = validate_config(tiny_config)
    assert task_languages(config, "cause") == ["en", "xb"]
    assert task_languages(config, "arith") == ["en", "xa", "xd"]


def test_task_languages_unknown_task(tiny_config):
    tiny_config["task_languages"] = {"mgsm": ["de"]}
    with pytest.raises(ConfigError, match=r"task_languages names tasks \['mgsm'\]"):
        validate_config(tiny_config)


def test_zone_override_outside_layers(tiny_config):
    tiny_config["routing"]["zone"]["override"] = [1, 5]
    with pytest.raises(ConfigError, match=r"routing.zone.override = \[1, 5\] lies outside the model's layers 0..1"):
        validate_config(tiny_config)


def test_expert_cap_above_top_k(tiny_config):
    tiny_config["routing"]["experts"]["max_per_layer"] = 3
    with pytest.raises(ConfigError, match="max_per_layer = 3 exceeds the model's top_k = 2"):
        validate_config(tiny_config)


def test_synthetic_general_text_needs_world(tiny_config):
    tiny_config["data"] = {"source": "real", "real": {"test_fraction": 0.4, "split_seed": 0, "tasks": {"mgsm": {"source": "local", "data_dir": "x"}}}}
    tiny_config["tasks"] = ["mgsm"]
    tiny_config["target_languages"] = ["de"]
    tiny_config["model"]["pretrain"]["tokenizer"]["kind"] = "byte"
    with pytest.raises(ConfigError, match="routing.general_text.source is 'synthetic' but data.source is 'real'"):
        validate_config(tiny_config)


def test_missing_input_path(tiny_config, tmp_path):
    from ramoe.config import check_input_paths

    tiny_config["routing"]["general_text"] = {"source": "file", "path": "absent/general.txt"}
    config = validate_config(tiny_config)
    with pytest.raises(ConfigError, match=r"routing.general_text.path = 'absent/general.txt' does not exist"):
        check_input_paths(config, base=tmp_path)
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "general.txt").write_text("text\n")
    check_input_paths(config, base=tmp_path)


def test_real_preset_valid(shared_data):
    from ramoe.config import check_input_paths

    # The preset's data paths are relative to the checkout; point them at the folder the tests found.
    text = (REPO / "config_real.yaml").read_text(encoding="utf-8").replace("../shared/data", str(shared_data))
    config = validate_config(yaml.safe_load(text))
    assert config["task_languages"]["mgsm"][0] == "bn"
    check_input_paths(config, base=REPO)
