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


def test_toml_roundtrip_keeps_every_field_that_is_none(tmp_path):
    """TOML has no null: None is written as "none" and read back as None, for every optional field of both
    sections and inside rope_scaling (the old writer dropped them, so the preset's value came back)."""
    import dataclasses

    from moeforge.config import ModelConfig, TrainConfig

    def optional(cls):
        return {f.name: None for f in dataclasses.fields(cls) if "None" in str(f.type)}

    run = resolve_run_config({}, {"preset": "v3", **optional(TrainConfig)}, optional(ModelConfig))
    assert run.model.q_lora_rank is None and run.model.rope_scaling is None and run.train.data is None
    yarn = resolve_run_config({}, {"preset": "v3"}, {"rope_scaling": {**PRESETS["v3"]["rope_scaling"], "mscale": None}})
    for original in (run, yarn):
        f = tmp_path / "config.toml"
        f.write_text(original.to_toml())
        assert resolve_run_config(load_toml(f)) == original
    # A string field whose real value is "none" stays a string.
    assert resolve_run_config(load_toml(f)).train.activation_checkpointing == "none"


def test_resume_config_check_names_changes_refuses_what_breaks_continuation():
    import dataclasses

    from moeforge.config import check_resume_config

    saved_run = resolve_run_config({}, {"preset": "debug"})
    saved = {"train": dataclasses.asdict(saved_run.train), "model": saved_run.model.to_dict()}
    assert check_resume_config(saved, saved_run, step=4) is None
    changed = resolve_run_config({}, {"preset": "debug", "batch_size": 4, "seed": 5, "eval_every": 7})
    with pytest.raises(ConfigError, match=r"batch_size 16 -> 4, seed 1234 -> 5, eval_every 100 -> 7\); "
                                          r"batch_size, seed would not.*--allow-config-change batch_size,seed"):
        check_resume_config(saved, changed, step=4)
    note = check_resume_config(saved, changed, step=4, allow="batch_size,seed")
    assert note == "config changed on resume: batch_size 16 -> 4, seed 1234 -> 5, eval_every 100 -> 7"
    # Layout, bookkeeping and a longer run are free; model fields are not; --steps cannot go back.
    free = resolve_run_config({}, {"preset": "debug", "nproc": 2, "ep": 2, "steps": 600})
    assert "nproc 1 -> 2, ep 1 -> 2" in check_resume_config(saved, free, step=4)
    other_model = resolve_run_config({}, {"preset": "debug"}, {"q_lora_rank": None})
    with pytest.raises(ConfigError, match="q_lora_rank 32 -> None"):
        check_resume_config(saved, other_model, step=4)
    with pytest.raises(ConfigError, match="--steps 3 is before the checkpoint's step 4"):
        check_resume_config(saved, resolve_run_config({}, {"preset": "debug", "steps": 3}), step=4)
    with pytest.raises(ConfigError, match="unknown field.*sed"):
        check_resume_config(saved, saved_run, step=4, allow="sed")
    # Runs from before `auto` was resolved recorded "auto": not a change.
    old = {**saved, "train": {**saved["train"], "precision": "auto"}}
    assert check_resume_config(old, resolve_run_config({}, {"preset": "debug", "precision": "fp32"}), step=4) is None
