"""A run's options: their declaration (`options`), one run's tree of them (`runconfig`),
the rules between them (`rules`), the defaults a run decides (`defaults`) and the checks
of single values (`values`)."""

from edgezo.config.options import FIELDS, RESUMABLE, SECTION_OF, SECTIONS
from edgezo.config.runconfig import RunConfig, coerce
from edgezo.config.values import normalize_dtype

__all__ = ["FIELDS", "RESUMABLE", "SECTIONS", "SECTION_OF", "RunConfig", "coerce",
           "normalize_dtype"]
