"""Shared ending of the distributed test scripts (imported from the script's own folder)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch.distributed as dist


def run_and_exit(main: Callable[[], None]) -> None:
    """Run ``main``, tear gloo down once every peer is done, and leave without interpreter finalization: gloo's
    native threads can hang it or abort it ("terminate called without an active exception") after the work is
    done and flushed."""
    main()
    if dist.is_initialized():
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
