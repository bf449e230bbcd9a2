"""`infra.memory.release_freed_memory`: free memory held by the C allocator goes back to the
system between the runs of one process."""

import gc

from infalign_jax.infra import memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1e3


def test_a_fragmented_heap_is_returned_to_the_system():
    """200,000 blocks of 1 KiB (past Python's small-object allocator: the C allocator's), every
    64th kept: the ~190 MB freed between them stay in the process (glibc trims only the top of
    its heap) until `release_freed_memory`. Where the C library has no malloc_trim, it says so
    and does nothing."""
    if memory._malloc_trim() is None:
        assert memory.release_freed_memory() is False
        return
    blocks = [bytearray(1024) for _ in range(200_000)]
    kept = blocks[::64]
    del blocks
    gc.collect()
    before = _rss_mb()
    assert memory.release_freed_memory() is True
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert len(kept) == 3125
