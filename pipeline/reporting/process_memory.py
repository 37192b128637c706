"""This process's memory, as the per-block metrics report it: the peak resident set and the
private (anonymous) memory now."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports kilobytes). It counts the pages
    of shared memory (the Ray object store) that the process has touched."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def private_bytes() -> int:
    """Resident anonymous memory now (RssAnon): the process's own heap, without the shared
    object-store pages and mapped files that `peak_rss_bytes` also counts."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
