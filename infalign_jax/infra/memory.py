"""Handing freed memory back to the system: between the trainings of commands that run several
in one process (`workflows.sweep.run`, `workflows.real_comparison`), and after each synchronous
checkpoint save (`checkpointing.Checkpointer.save`).

glibc's allocator keeps the memory a run frees (its host copies, the runtime's buffers) in its
arenas, fragmented among what stays allocated, so a process that trains run after run grows:
three SmolLM2 tiny runs in one process held 4.4, 5.4 and 6.2 GB of RSS after each (no JAX array
left alive), and `malloc_trim(0)` brought the process back to 1.1 GB. Within a run, the same
holds for a synchronous save's host copies of the state: the SmolLM2 tiny run (a checkpoint every
step, two runs sharing 2 cores) peaked at 6.5 and 6.7 GB, growing step by step; with at most 2
arenas (`MALLOC_ARENA_MAX=2`) at 5.2 and 5.7 GB; with a trim after each save at 4.6 GB, each trim
taking 0.3-0.5 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Collects Python's garbage, then asks the C allocator to return the free memory it holds
    to the system (glibc's `malloc_trim(0)`). Returns whether the allocator could be asked
    (False on a C library without it, e.g. macOS or musl, where nothing is done)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
