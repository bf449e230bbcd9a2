import pytest

from infalign_jax.infra.config_utils import parse_arg


def test_parse_arg_types_and_defaults():
    c = parse_arg("n=4,size=tiny,beta=0.5,fast=false,ns=1;2;8", n=1, size="small", beta=1.0,
                  fast=True, ns=(1,))
    assert (c.n, c.size, c.beta, c.fast, c.ns) == (4, "tiny", 0.5, False, (1, 2, 8))
    assert parse_arg(None, n=3).n == 3


@pytest.mark.parametrize("arg,match", [("m=4", "unknown config arg 'm'"),
                                       ("n=four", "'n': expected an integer"),
                                       ("n", "not key=value"),
                                       # "size=small,size=tiny" ran the tiny config, silently
                                       ("n=3000,n=30", r"config arg 'n' is given twice \('3000' "
                                                       r"and '30'")])
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        parse_arg(arg, n=1)


def test_config_section_holds_the_dataclass_defaults_and_only_the_changes():
    from infalign_jax.infra.config_utils import config_section, dataclass_from
    from infalign_jax.rl import RLConfig
    c = config_section(RLConfig, beta=0.5)
    assert c.beta == 0.5 and c.learning_rate == RLConfig.learning_rate
    # Fields the code sets (the task's EOS id, the transform section) are not config keys.
    assert "eos_id" not in c and "transform" not in c
    cfg = dataclass_from(RLConfig, c.to_dict(), "rl", eos_id=3)
    assert cfg.beta == 0.5 and cfg.eos_id == 3 and cfg.ppo_clip == RLConfig.ppo_clip
    with pytest.raises(ValueError, match=r"config.rl.eos_id is set by the task"):
        dataclass_from(RLConfig, {**c.to_dict(), "eos_id": 3}, "rl")
    with pytest.raises(ValueError, match=r"unknown keys \['betta'\]"):
        config_section(RLConfig, betta=0.5)
    with pytest.raises(ValueError, match=r"config.rl: unknown keys \['betta'\]"):
        dataclass_from(RLConfig, {"betta": 0.5}, "rl")


def test_transform_section_carries_every_family_parameter():
    from infalign_jax.core.transforms import transform_from_config, transform_section
    s = transform_section("exp", t=-4.0)
    assert s["name"] == "exp" and s["t"] == -4.0 and s["path"] == "" and "p" in s and "s" in s
    assert transform_from_config(s) == ("exp", {"t": -4.0})
    # the unset parameters of the other families (None, "" for optimal's path) pass a run's check
    assert transform_from_config(s, strict=True) == ("exp", {"t": -4.0})
    assert transform_from_config({**s, "name": "power", "p": 0.25})[1]["p"] == 0.25
    with pytest.raises(ValueError, match=r"unknown parameters \['q'\]"):
        transform_section("exp", q=1.0)


def test_experiment_config_sections_are_the_dataclass_fields():
    """Config files build their sections from the dataclasses (config_section), so a section holds
    exactly the dataclass's config fields: a default added to the library reaches every config."""
    import os
    from infalign_jax.infra.config_utils import config_fields, load_config_module
    from infalign_jax.infra.sharding import MeshConfig
    from infalign_jax.loops.train import TrainConfig
    from infalign_jax.rl import RLConfig
    from infalign_jax.rl.tasks import ReferenceConfig
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("ctrl_exact", "ctrl_real"):
        c = load_config_module(os.path.join(root, "configs", f"{name}.py")).get_config()
        for section, cls in (("rl", RLConfig), ("train", TrainConfig), ("mesh", MeshConfig),
                             ("reference", ReferenceConfig)):
            assert set(c[section]) == {f.name for f in config_fields(cls)}, (name, section)
