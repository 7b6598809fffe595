"""Block streaming: decoder layers whose weights do not fit on the compute device live in
a slower tier and are brought in one at a time, just before they compute.

- ``host`` (CUDA only): pinned host memory (`host.py`);
- ``disk``: one safetensors file per layer (`disk.py`), the only tier on a CPU.

`base.py` holds the lifecycle both share: hold → acquire → forward → release.
"""

from __future__ import annotations

import os

import torch

from edgezo.errors import ConfigError
from edgezo.zo.blocks import Unit
from edgezo.zo.stream.base import BlockStreamer
from edgezo.zo.stream.disk import DiskStreamer
from edgezo.zo.stream.host import HostStreamer

TIERS = ("host", "disk")


def make_streamer(units: list[Unit], trainable: set[int], device: torch.device | str,
                  tier: str = "disk", folder: str | os.PathLike | None = None,
                  buffers: int | None = None, master_dtype: torch.dtype | None = None
                  ) -> BlockStreamer:
    """The streamer of `tier` for these layers (see BlockStreamer for the arguments;
    `folder`: where the disk tier's files go, a temporary folder by default)."""
    if tier == "host":
        return HostStreamer(units, trainable, device, buffers, master_dtype)
    if tier == "disk":
        return DiskStreamer(units, trainable, device, folder, buffers, master_dtype)
    raise ConfigError(f"unknown offload tier {tier!r}; valid: {', '.join(TIERS)}")


__all__ = ["TIERS", "BlockStreamer", "DiskStreamer", "HostStreamer", "make_streamer"]
