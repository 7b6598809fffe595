"""What the compute device really does fast: the CPU's instruction set decides whether
half-precision matmuls are native or emulated.

On a CPU without AVX-512 BF16 or AMX (most laptops and desktops: AVX2 only), torch
emulates bf16 matmuls in software, far slower than the same matmuls in fp32, and a ZO
step is mostly matmuls (BENCHMARKS.md, "Step time"). So when the user did not choose a
dtype and the CPU computes, a run computes in fp32 where the profile's half precision is
not native, as long as the plan still fits.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 'flags', Arm 'Features')."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _torch_says(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def native_on_cpu(dtype: str) -> bool:
    """Whether this CPU computes `dtype` (fp32, bf16, fp16) matmuls natively."""
    if dtype == "fp32":
        return True
    flags = _cpu_flags()
    if dtype == "bf16":
        return (_torch_says("_is_avx512_bf16_supported") or "avx512_bf16" in flags
                or "amx_bf16" in flags or "bf16" in flags)  # Arm: FEAT_BF16
    return (_torch_says("_is_amx_fp16_supported") or "avx512_fp16" in flags
            or "amx_fp16" in flags or "asimdhp" in flags)


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use (AVX2, AVX512, ...), with the
    half-precision features that matter, for every benchmark's header."""
    native = [d for d in ("bf16", "fp16") if native_on_cpu(d)]
    return (f"{torch.backends.cpu.get_cpu_capability()} ({platform.machine()}; native "
            f"half precision: {', '.join(native) or 'none'})")


def preferred_dtype(requested: str | None, profile_dtype: str, device: torch.device
                    ) -> tuple[str, str]:
    """(dtype, why): what the user asked for; else, on a CPU whose half precision is not
    native, fp32; else the profile's. The caller falls back to the profile's dtype when
    fp32 does not fit the budget."""
    if requested is not None:
        return requested, "as asked (--dtype)"
    if device.type != "cpu" or profile_dtype == "fp32" or native_on_cpu(profile_dtype):
        return profile_dtype, f"the profile's dtype ({profile_dtype})"
    return "fp32", (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native "
                    f"{profile_dtype} math, which it would emulate several times slower "
                    "than fp32; the plan fits in fp32")
