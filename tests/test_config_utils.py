import pytest

from infalign_jax.config_utils import parse_arg


def test_parse_arg_types_and_defaults():
    c = parse_arg("n=4,size=tiny,beta=0.5,fast=false,ns=1;2;8", n=1, size="small", beta=1.0,
                  fast=True, ns=(1,))
    assert (c.n, c.size, c.beta, c.fast, c.ns) == (4, "tiny", 0.5, False, (1, 2, 8))
    assert parse_arg(None, n=3).n == 3


@pytest.mark.parametrize("arg,match", [("m=4", "unknown config arg 'm'"),
                                       ("n=four", "'n': expected an integer"),
                                       ("n", "not key=value")])
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        parse_arg(arg, n=1)
