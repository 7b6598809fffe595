"""edgezo: forward-only (zeroth-order) fine-tuning of LLMs on machines with little memory."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import edgezo` (and `edgezo --help`) does not import torch and transformers.
    if name == "Session":
        from edgezo.session import Session

        return Session
    if name == "RunConfig":
        from edgezo.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'edgezo' has no attribute {name!r}")


__all__ = ["RunConfig", "Session", "__version__"]
