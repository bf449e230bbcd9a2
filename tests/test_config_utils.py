import numpy as np
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


@pytest.mark.parametrize("text,value", [("1", True), ("True", True), (" yes ", True), ("ON", True),
                                        ("0", False), ("False", False), ("no", False),
                                        ("off", False)])
def test_parse_arg_reads_the_usual_boolean_spellings(text, value):
    assert parse_arg(f"fast={text}", fast=not value).fast is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "truthy"])
def test_parse_arg_refuses_a_boolean_it_cannot_read(text):
    """A bool(text) reading would make any non-empty word True (and "0" too)."""
    with pytest.raises(ValueError, match="'fast': expected a boolean"):
        parse_arg(f"fast={text}", fast=False)


def test_parse_arg_keeps_an_equals_sign_in_a_value_and_skips_empty_tuple_parts():
    c = parse_arg("path=a=b.npz,ns=1;2;", path="", ns=(1,))
    assert c.path == "a=b.npz" and c.ns == (1, 2)


def test_float_text_is_short_where_exact_and_full_where_not():
    from infalign_jax.infra.config_utils import float_text
    assert float_text(2.0) == "2" and float_text(0.2) == "0.2" and float_text(1e-5) == "1e-05"
    # ":g" keeps 6 digits: two betas of a sweep would share one name
    assert float_text(2.0000001) != float_text(2.0)
    assert float(float_text(2.0000001)) == 2.0000001
    assert float(float_text(0.123456789)) == 0.123456789


def test_comma_list_drops_blanks():
    from infalign_jax.infra.config_utils import comma_list
    assert comma_list("bon, won,") == ("bon", "won")
    assert comma_list(" , ") == ()


def test_arg_keys_are_the_keys_written():
    from infalign_jax.infra.config_utils import arg_keys
    assert arg_keys(" samples = 8, steps=3,tiny") == {"samples", "steps"}
    assert arg_keys(None) == set()


def test_config_section_leaves_out_the_excluded_fields():
    from infalign_jax.infra.config_utils import config_section
    from infalign_jax.rl import RLConfig
    c = config_section(RLConfig, exclude=("beta",), learning_rate=0.5)
    assert "beta" not in c and c.learning_rate == 0.5
    with pytest.raises(ValueError, match=r"unknown keys \['beta'\]"):
        config_section(RLConfig, exclude=("beta",), beta=0.5)


class _Fields:
    """An object holding the fields a validator reads (the dataclasses pass themselves)."""
    _config_owner = "config.x"

    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("value,ok", [(1, True), (np.int64(3), True), (0, False), (-1, False),
                                      (True, False), (1.0, False), ("1", False)])
def test_ints_take_positive_integers_only(value, ok):
    from infalign_jax.infra import validate
    obj = _Fields(n=value)
    if ok:
        validate.ints(obj, ["n"])
        assert validate.int_arg("n", value) == value
    else:
        with pytest.raises(ValueError, match=r"config.x.n must be a positive integer, got"):
            validate.ints(obj, ["n"])
        with pytest.raises(ValueError, match=r"^n must be a positive integer, got"):
            validate.int_arg("n", value)


def test_int_bounds_and_optional_none():
    from infalign_jax.infra import validate
    validate.ints(_Fields(n=0), ["n"], low=0)
    validate.ints(_Fields(n=None), ["n"], optional=True)
    with pytest.raises(ValueError, match=r"config.x.n must be an integer >= 0, got None"):
        validate.ints(_Fields(n=None), ["n"], low=0)
    with pytest.raises(ValueError, match=r"config.x.n must be None or an integer >= 0, got -1"):
        validate.ints(_Fields(n=-1), ["n"], low=0, optional=True)
    assert validate.int_arg("k", 0, low=0) == 0 and validate.int_arg("k", None, optional=True) \
        is None
    with pytest.raises(ValueError, match=r"^k must be a positive integer, got None$"):
        validate.int_arg("k", None)


def test_int_tuple_bounds_repeats_and_emptiness():
    from infalign_jax.infra import validate
    obj = _Fields(ks=[1, 4])
    validate.int_tuple(obj, "ks", "positive ints", low=1, high=4, distinct=True)
    assert obj.ks == (1, 4)   # stored back as a tuple
    validate.int_tuple(_Fields(ks=(0, 0)), "ks", "ints >= 0", low=0)
    for bad in ([], [0, 1], [1, 5], [2, 2], [1, True], "12", 3):
        with pytest.raises(ValueError, match=r"config.x.ks must be distinct ints in \[1, 4\]"):
            validate.int_tuple(_Fields(ks=bad), "ks", "distinct ints in [1, 4]", low=1, high=4,
                               distinct=True)


def test_numbers_bounds_strict_and_high():
    from infalign_jax.infra import validate
    validate.numbers(_Fields(x=0.0), ["x"])
    validate.numbers(_Fields(x=1.0), ["x"], strict=True, high=1.0)
    with pytest.raises(ValueError, match=r"config.x.x must be a finite number > 0, got 0.0"):
        validate.numbers(_Fields(x=0.0), ["x"], strict=True)
    with pytest.raises(ValueError, match=r"must be a finite number >= 0, got -1e-09"):
        validate.numbers(_Fields(x=-1e-9), ["x"])
    with pytest.raises(ValueError, match=r"must be a finite number >= 0 and <= 1, got 1.5"):
        validate.numbers(_Fields(x=1.5), ["x"], high=1.0)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="must be a finite number"):
            validate.numbers(_Fields(x=bad), ["x"])


def test_bools_refuse_integers():
    from infalign_jax.infra import validate
    validate.bools(_Fields(flag=False), ["flag"])
    for bad in (0, 1, "true", None):
        with pytest.raises(ValueError, match="config.x.flag must be a bool"):
            validate.bools(_Fields(flag=bad), ["flag"])


def test_a_refusal_that_names_its_config_key_is_not_prefixed_again():
    """A section whose field checks already say ``config.train.<key>`` keeps that message; one
    whose checks name the dataclass gets the section in front."""
    from infalign_jax.infra.config_utils import config_section, dataclass_from
    from infalign_jax.loops.train import TrainConfig
    from infalign_jax.rl import RLConfig
    values = config_section(TrainConfig).to_dict()
    with pytest.raises(ValueError, match=r"^config\.train\.num_steps must be a positive integer, "
                                         r"got 0$"):
        dataclass_from(TrainConfig, {**values, "num_steps": 0}, "train")
    with pytest.raises(ValueError, match=r"^config\.rl: RLConfig\.beta must be"):
        dataclass_from(RLConfig, {**config_section(RLConfig).to_dict(), "beta": -1.0}, "rl",
                       eos_id=1)
