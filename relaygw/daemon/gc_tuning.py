"""Process-wide interpreter settings for a long-running relaygw process."""

from __future__ import annotations

import gc

# Allocations between young-generation collections (CPython's default is 700).
# Each message makes hundreds of short-lived objects (Deferreds, log events);
# with the default the collector ran every few messages.
GC_THRESHOLD = 10_000


def quiet_garbage_collector() -> None:
    """Call once start-up is done: what exists by then (modules, configuration)
    is never scanned again, and the cyclic collector runs less often."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
