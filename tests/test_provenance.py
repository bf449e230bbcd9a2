"""Run manifests carry config, seeds, versions, devices, git state and input hashes."""

import hashlib
import json
import subprocess

import ml_collections

from infalign_jax import provenance


def test_manifest_contents(tmp_path):
    data = tmp_path / "table.npz"
    data.write_bytes(b"reference table bytes")
    cfg = ml_collections.ConfigDict({"transform": {"name": "exp", "t": 4.0}, "seed": 3})
    path = provenance.write_manifest(str(tmp_path / "out"), cfg, seeds={"seed": 3},
                                     inputs={"reference_table": str(data)},
                                     started="2026-01-01T00:00:00+00:00")
    m = json.loads(open(path).read())
    assert m["config"] == {"transform": {"name": "exp", "t": 4.0}, "seed": 3}
    assert m["seeds"] == {"seed": 3}
    assert m["inputs"]["reference_table"]["sha256"] == hashlib.sha256(b"reference table bytes").hexdigest()
    assert m["devices"]["device_count"] == 8  # conftest forces 8 CPU devices
    assert m["packages"]["jax"] is not None
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:
        assert m["git"]["revision"] == head
        assert isinstance(m["git"]["dirty"], bool)
    assert not (tmp_path / "out" / "manifest.json.tmp").exists()
