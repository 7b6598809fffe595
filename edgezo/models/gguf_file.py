"""Is a .gguf file whole? A walk over its header (metadata and tensor table) that says
how many bytes the file must hold, without reading any tensor.

Why: a download or copy stopped early leaves a file that starts like a GGUF. transformers
reads it until it runs out, then fails as `struct.error: unpack_from requires a buffer`
(cut in the header) or as a reshape error it reports as an unsupported architecture (cut
in the tensors): neither says to download the file again, and the second can come after
seconds of parsing. The header says where every tensor ends, so a file shorter than that
is known to be cut short before anything loads (a few milliseconds: the walk skips the
vocabulary's strings rather than decoding them).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from edgezo.errors import ModelLoadError

V = gguf.GGUFValueType
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.BOOL: "?", V.UINT16: "H", V.INT16: "h",
            V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f", V.UINT64: "Q", V.INT64: "q",
            V.FLOAT64: "d"}
_WIDTH = {t: struct.calcsize("<" + f) for t, f in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MAX_DIMS = 8  # ggml has 4; more is a damaged table, not a tensor
DEFAULT_ALIGNMENT = 32  # GGUF's, when general.alignment is absent


class _Cut(Exception):
    """The header runs past the end of the file."""


class _Unknown(Exception):
    """A value type this walk does not know (a newer GGUF): it cannot tell the size."""


class _Walk:
    def __init__(self, buf) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def scalar(self, s: struct.Struct):
        if self.pos + s.size > self.end:
            raise _Cut
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > self.end:
            raise _Cut

    def string(self, keep: bool = False) -> bytes | None:
        n = self.scalar(_U64)
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos]) if keep else None

    def value(self, kind: int) -> None:
        if kind in _WIDTH:
            self.skip(_WIDTH[kind])
        elif kind == V.STRING:
            self.string()
        elif kind == V.ARRAY:
            inner, count = self.scalar(_U32), self.scalar(_U64)
            if inner in _WIDTH:
                self.skip(count * _WIDTH[inner])
            else:
                for _ in range(count):
                    self.value(inner)
        else:
            raise _Unknown


def expected_size(buf) -> int | None:
    """The bytes a GGUF file must hold: where its last tensor ends. None where the header
    uses a type this walk does not know. Raises _Cut when the header itself runs past the
    end of `buf`."""
    w = _Walk(buf)
    w.skip(4)  # the magic
    version = w.scalar(_U32)
    if version not in (2, 3):  # v1 counts in 32 bits; later versions: unknown
        return None
    n_tensors, n_values = w.scalar(_U64), w.scalar(_U64)
    alignment = DEFAULT_ALIGNMENT
    try:
        for _ in range(n_values):
            key = w.string(keep=True)
            kind = w.scalar(_U32)
            if key == b"general.alignment" and kind == V.UINT32:
                alignment = w.scalar(_U32) or DEFAULT_ALIGNMENT
            else:
                w.value(kind)
        end = 0
        for _ in range(n_tensors):
            w.string()
            n_dims = w.scalar(_U32)
            if n_dims > _MAX_DIMS:
                raise _Cut  # garbage where the table should be
            dims = [w.scalar(_U64) for _ in range(n_dims)]
            kind, offset = w.scalar(_U32), w.scalar(_U64)
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                return None  # a tensor type this gguf package does not know
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * size)
    except _Unknown:
        return None
    data_start = -(-w.pos // alignment) * alignment
    return data_start + end


def check_gguf(path: Path, fix: str = "download it again") -> None:
    """Raise ModelLoadError when `path` is not a whole GGUF file: empty, not GGUF at all,
    or cut short (in its header, or before its last tensor ends). `fix` says how to get a
    whole one."""
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes): a download or copy that never "
                             f"started; {fix}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if not b"GGUF".startswith(buf[:4]):  # (a file of 1-3 bytes is cut short below)
            raise ModelLoadError(
                f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'): "
                f"damaged, or something else saved under its name (an HTML error page "
                f"from a failed download?); {fix}")
        try:
            expected = expected_size(buf)
        except _Cut:
            raise ModelLoadError(
                f"{path} is cut short or damaged: it ends at {size:,} bytes, inside its "
                f"header (the metadata and tensor table), before any weight; {fix}"
            ) from None
    if expected is not None and size < expected:
        raise ModelLoadError(
            f"{path} is cut short: it holds {size:,} bytes, but its header says its tensors "
            f"end at {expected:,} ({size / expected:.0%} of the file is there). A download "
            f"or copy stopped early; {fix}")
