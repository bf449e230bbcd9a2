"""The compile check against the TPU compiler: a tiny model's CTRL step compiled for v5e:2x2.

Run by `make test-tpu` in .venv-tpu (libtpu installed); `make test` does not collect this folder.
Without libtpu the module fails at collection with that message instead of skipping, so a
misconfigured CI cannot pass it silently. About 15 s on 2 CPU cores (one compile).
"""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("tests_tpu needs libtpu (the tpu-aot extra): run `make test-tpu`, which "
                       "builds .venv-tpu, not the main virtualenv")

from infalign_jax.infra import aot  # noqa: E402
from infalign_jax import rl  # noqa: E402
from infalign_jax.workflows import compile_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pod_config(arg):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import pod
    finally:
        sys.path.pop(0)
    return pod.get_config(arg)


@pytest.fixture(scope="module")
def tiny_check():
    return compile_check.check_one(_pod_config("model=tiny,topology=v5e:2x2"), "rl")


def test_argument_bytes_are_what_the_shardings_imply(tiny_check):
    """The compiler's per-chip argument bytes = sum over every input leaf of its bytes divided by
    the shards its sharding makes. TPU tiling pads the small replicated arrays (the prompt table,
    the batch, scalars: 17 KiB here); the model's dimensions are multiples of 128, so its
    parameters and moments are not padded."""
    reported, expected = tiny_check.report.argument_bytes, tiny_check.expected_argument_bytes
    assert expected <= reported <= expected + 32 * 1024, (reported, expected)


def test_fsdp_splits_the_state(tiny_check):
    """The implied bytes are those of an FSDP split: the params and Adam moments replicated
    would take ~4x the per-chip bytes (fsdp=4), far outside the tolerance above."""
    model_cfg, rl_cfg, mesh_cfg, work = compile_check.configs(
        _pod_config("model=tiny,topology=v5e:2x2"))
    mesh = aot.topology_mesh("v5e:2x2", mesh_cfg)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    optimizer = rl.make_optimizer(rl_cfg)
    state, frozen, batch, rng = compile_check.abstract_inputs(
        model_cfg, rl_cfg, work, mesh, jax.numpy.bfloat16, optimizer)
    params = aot.sharded_bytes(state.params)
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    assert params == pytest.approx(full / 4, rel=0.01)
    replicated = params * 4 * 3   # params + mu + nu, unsplit
    assert tiny_check.report.argument_bytes < replicated / 2


def test_report_is_consistent(tiny_check):
    r = tiny_check.report
    assert r.num_chips == r.num_devices == 4 and r.chip.name == "v5e"
    # The state is donated: its buffers are reused for the new state.
    assert 0 < r.alias_bytes <= min(r.argument_bytes, r.output_bytes)
    assert r.total_bytes == (r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
                             + r.code_bytes)
    assert r.fits(0.9)
    # XLA counts each scan body once (layers, decode steps), so it reports less than the
    # shape-based count, but the same order of magnitude at 2 layers.
    assert 0 < r.flops < tiny_check.flops_estimate < 20 * r.flops
    assert 0 < r.compile_s < 600   # wall time: generous, the CI machine may be loaded


@pytest.mark.parametrize("generation", sorted(aot.TOPOLOGIES))
def test_listed_topologies_are_accepted(generation):
    for name in aot.TOPOLOGIES[generation]:
        devices = aot.topology_devices(name)
        assert len(devices) % aot.chips_in(name) == 0, name


def test_unknown_topology_is_refused():
    with pytest.raises(ValueError, match="unknown TPU generation"):
        aot.topology_devices("v9x:2x2")
    with pytest.raises(ValueError, match="cannot build TPU topology"):
        aot.topology_devices("v5e:3x7")


def test_batch_must_split_over_the_mesh():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 batch shards"):
        compile_check.run(_pod_config("model=tiny,topology=v5e:2x2,batch_size=6"))



def test_cli_exits_1_naming_the_largest_buffers_when_it_does_not_fit():
    """The command a user runs: the report on stdout; asked for more headroom than any program
    leaves, exit status 1 and the compiler's largest allocations on stderr."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "compile_check.py"),
         "--config=configs/pod.py:model=tiny,topology=v5e:2x2", "--config.min_headroom=0.9999"],
        # This process holds libtpu's lock file (/tmp/libtpu_lockfile) already.
        cwd=ROOT, env=dict(os.environ, INFALIGN_JAX_CACHE="off", ALLOW_MULTIPLE_LIBTPU_LOAD="1"),
        capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "total / device" in proc.stdout and "arguments implied by shardings" in proc.stdout
    assert "error: does not fit" in proc.stderr
    after = proc.stderr.split("largest buffers:")[1].splitlines()
    listed = [line for line in after if line.startswith("  ")]
    assert len(listed) == 5 and all("[" in line for line in listed), proc.stderr[-2000:]
    assert after[-1] == "error: does not fit: rl (rollout layout train)", proc.stderr[-2000:]


def test_a_step_whose_temporaries_exceed_hbm_is_refused_by_name():
    """65,536 prompts without remat: the compiler refuses (its temporaries alone exceed 16 GiB);
    the check raises `DoesNotFit` with the compiler's numbers (the CLI exits 1 with it)."""
    config = _pod_config("model=tiny,topology=v5e:2x2,batch_size=65536")
    config.model.remat = "none"
    with pytest.raises(compile_check.DoesNotFit, match=r"temporaries \(\d+.*exceeds available HBM"):
        compile_check.run(config)
