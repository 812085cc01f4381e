"""Plumbing: the host's memory, as the CPU training step needs it.

Guarantees: `keep_freed_memory_mapped` changes nothing off glibc or off the CPU backend, and
`OPENMOE_MALLOC=default` turns it off; `memory_bytes` never overstates a device's memory.
"""

from __future__ import annotations

import ctypes
import os

import jax


def keep_freed_memory_mapped() -> bool:
    """On a CPU, ask glibc to keep freed memory for reuse rather than hand it back to the OS.

    XLA:CPU allocates and frees buffers of many MiB every step, and glibc returns blocks that
    large to the OS at once, so every step page-faults fresh memory. With no block served by
    mmap and trimming off, the pages stay and are reused (benchmarks/README.md has the figure).
    Set OPENMOE_MALLOC=default to turn it off. Returns whether it was applied.
    """
    if os.environ.get("OPENMOE_MALLOC", "keep") == "default" or jax.default_backend() != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def memory_bytes(device: jax.Device) -> int | None:
    """How much memory one device has: an accelerator's own limit, or for a CPU device the
    host's physical memory shared by all CPU devices; None where neither can be read."""
    try:
        stats = device.memory_stats() if device.platform != "cpu" else None
    except (RuntimeError, NotImplementedError):  # a backend that keeps no statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None
