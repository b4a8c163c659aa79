"""Prompt templates, rendered in a Jinja sandbox (no attribute tricks, no filesystem)."""

from __future__ import annotations

from distill.core.errors import DistillError
from distill.core.templates import render_template


def render(template: str, **values) -> str:
    """Render ``template`` with ``values``; errors name the template problem."""
    from jinja2 import TemplateError

    try:
        return render_template(template, **values)
    except (TemplateError, TypeError) as e:  # TypeError: include/import with no loader (no filesystem)
        raise DistillError(
            f"prompt template {template!r} failed: {type(e).__name__}: {e}",
            "use only the documented variables ({{ question }}); attributes, imports and files are not allowed",
        ) from None
