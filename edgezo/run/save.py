"""Writing a session's model where its runtime reads it: a run folder that `edgezo export`
reads, or one format (edgezo.export.run.export_model)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgezo.errors import ConfigError
from edgezo.export.run import base_gguf, export_model
from edgezo.models.catalog import SCHEMES
from edgezo.models.quantized import save_quantized

if TYPE_CHECKING:
    from edgezo.run.session import Session


def save_session(session: Session, out: Path, format: str | None, gguf_type: str | None
                 ) -> Path:
    """See Session.save."""
    session.check_not_torn("save")
    session.engine.flush()
    session.engine.perturbation.remove()  # write the plain HF module
    try:
        with session.streamer.materialized() if session.streamer else contextlib.nullcontext():
            if format is not None:
                return _export(session, out, format, gguf_type)
            if gguf_type is not None:
                raise ConfigError("gguf_type applies to format='gguf'")
            out.mkdir(parents=True, exist_ok=True)
            if SCHEMES[session.config.scheme.scheme].quantized_scales:  # the quantized model
                save_quantized(session.module, out)
            else:
                session.module.save_pretrained(out)
    finally:
        session.engine.perturbation.install()
    session.tokenizer.save_pretrained(out)
    (out / "report.json").write_text(json.dumps(session.report(), indent=2))
    return out


def _export(session: Session, out: Path, fmt: str, gguf_type: str | None) -> Path:
    if SCHEMES[session.config.scheme.scheme].quantized_scales:
        if fmt != "merged":
            raise ConfigError(f"a scales run is its quantized base with trained scales; "
                              f"{fmt} export reads dense weights: save it with "
                              "format='merged' (the quantized model)")
        return save_quantized(session.module, out, session.tokenizer)
    base = base_gguf(session.config.model.model) if fmt == "gguf" else None
    meta = {"task": session.config.data.task, "model": session.config.model.model,
            "template": session.task.template if session.task is not None else None}
    return export_model(session.module, session.tokenizer, fmt, out, gguf_type=gguf_type,
                        base_gguf=base, meta=meta)
