"""Kernel templates: the emitted source lives in files, the emitters only fill them in.

A template is a file under ``hw_targets/templates/<target>/`` in the target's dialect
with ``$name`` / ``${name}`` placeholders (:class:`string.Template`: the dialects are
C-like and never use ``$``, while ``{`` and ``}`` are everywhere, which is why not
``str.format``). Every placeholder must be given (a missing one raises ``KeyError``), so
a template cannot silently emit a hole; a value is either a number of the target's
description or of the kernel's shape, or another rendered template (an optional part
such as a bias epilogue, chosen from a table by the emitter).
"""

from __future__ import annotations

import functools
from pathlib import Path
from string import Template

__all__ = ["TEMPLATE_DIR", "render"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


@functools.cache
def _load(target: str, template: str) -> Template:
    return Template((TEMPLATE_DIR / target / template).read_text())


def render(target: str, template: str, /, **values: object) -> str:
    """``templates/<target>/<template>`` with every placeholder replaced by ``values``
    (values the template does not name are ignored)."""
    return _load(target, template).substitute({k: str(v) for k, v in values.items()})
