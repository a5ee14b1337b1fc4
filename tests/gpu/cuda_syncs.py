"""Counting host-device synchronisations, shared by the CUDA tests and ``benchmarks/encode.py``."""
import warnings
from typing import Callable

import torch


def device_syncs(function: Callable[[], object]) -> int:
    """How many times one call of ``function`` synchronises the host with the current CUDA device.

    Counted with ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronising CUDA call.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
