"""edgezo: forward-only (zeroth-order) fine-tuning of LLMs on machines with little memory."""

from edgezo.device.threads import limit_openmp_spin
from edgezo.version import __version__

# Before torch's import loads the OpenMP runtime, which reads it then: idle OpenMP threads
# spin briefly, not for milliseconds, on cores that other processes may need
# (edgezo.device.threads). The CLI and `import edgezo` both come here first; the user's own
# settings are kept.
limit_openmp_spin()


def __getattr__(name: str):
    # Lazy, so `import edgezo` (and `edgezo --help`) does not import torch and transformers.
    if name == "Session":
        from edgezo.run.session import Session

        return Session
    if name == "RunConfig":
        from edgezo.config.runconfig import RunConfig

        return RunConfig
    raise AttributeError(f"module 'edgezo' has no attribute {name!r}")


__all__ = ["RunConfig", "Session", "__version__"]
