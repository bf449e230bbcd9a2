"""XLA_FLAGS for the tests' subprocesses: this process's flags (such as the compile optimisation
level `make test` sets) with conftest's device count replaced."""

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
    """This process's XLA_FLAGS without the fake device count; with `devices`, that count."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT)]
    if devices is not None:
        flags.append(f"{DEVICE_COUNT}={devices}")
    return " ".join(flags)
