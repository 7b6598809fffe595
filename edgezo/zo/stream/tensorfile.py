"""The safetensors header: a file's tensor index, read without loading any tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_header(path: str | Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte where the data starts).

    A tensor's bytes are at data_start + data_offsets[0] .. data_start + data_offsets[1].
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n
