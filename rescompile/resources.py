"""What this machine can hold: a plan's memory is checked against it before it is allocated,
so `--batch 100000000` is one line naming the bytes, not a MemoryError (or the OOM killer)
halfway through an allocation."""

from __future__ import annotations

import os

from .errors import ResourceError

GIB = 2.0 ** 30


def available_bytes() -> int:
    """Memory a new allocation can have now: MemAvailable, else all physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(nbytes: int, what: str) -> None:
    have = available_bytes()
    if nbytes > have:
        raise ResourceError(f"{what} need {nbytes / GIB:.1f} GiB; this machine has "
                            f"{have / GIB:.1f} GiB available")
