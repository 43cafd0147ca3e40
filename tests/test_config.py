import pytest

from moeforge.config import ModelConfig, PRESETS, TrainConfig, load_toml, preset, resolve_run_config
from moeforge.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    assert preset(name).validate()


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group=3 must divide"),
    (dict(topk_group=3), "topk_group=3"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "cannot supply"),
])
def test_impossible_model_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**PRESETS["debug"], **change}).validate()


def test_unknown_fields_and_bad_types_are_rejected():
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="hidden_size must be of type int"):
        ModelConfig.from_dict({"hidden_size": "wide"})
    with pytest.raises(ConfigError, match="unknown train config field"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("v9")


def test_priority_preset_then_toml_then_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\npreset = "debug"\nsteps = 7\nlr = 0.01\n[model]\nn_routed_experts = 16\n')
    run = resolve_run_config(load_toml(f), {"steps": "9"}, {"num_experts_per_tok": 4})
    assert run.train.steps == 9 and run.train.lr == 0.01
    assert run.model.n_routed_experts == 16 and run.model.num_experts_per_tok == 4
    assert run.model.hidden_size == PRESETS["debug"]["hidden_size"]


def test_toml_roundtrip_and_errors(tmp_path):
    run = resolve_run_config({}, {"preset": "v3"})
    f = tmp_path / "config.toml"
    f.write_text(run.to_toml())
    again = resolve_run_config(load_toml(f))
    assert again == run and again.model.rope_scaling["factor"] == 40.0 and again.model.q_lora_rank == 1536
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
