"""Prompt templates, rendered in a Jinja sandbox (no attribute tricks, no filesystem)."""

from __future__ import annotations

from functools import cache

from distill.core.errors import DistillError


@cache
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render(template: str, **values) -> str:
    """Render ``template`` with ``values``; errors name the template problem."""
    from jinja2 import TemplateError

    try:
        return _env().from_string(template).render(**values)
    except (TemplateError, TypeError) as e:  # TypeError: include/import with no loader (no filesystem)
        raise DistillError(
            f"prompt template {template!r} failed: {type(e).__name__}: {e}",
            "use only the documented variables ({{ question }}); attributes, imports and files are not allowed",
        ) from None
