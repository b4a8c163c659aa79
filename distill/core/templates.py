"""Jinja templates from recipes, rendered in a sandbox (no attribute tricks, no filesystem, no imports).

Recipe templates are user input and the values they render are dataset rows or model text: both are
untrusted, so every template goes through one ``ImmutableSandboxedEnvironment`` with strict undefined
variables (a misspelt column is an error, not an empty string)."""

from __future__ import annotations

from functools import cache


@cache
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@cache
def compile_template(template: str):
    """The compiled template; ``jinja2.TemplateError`` when its syntax is wrong."""
    return _env().from_string(template)


def render_template(template: str, **values) -> str:
    """Render ``template``; raises ``jinja2.TemplateError`` or ``TypeError`` (include/import with no
    loader) for the caller to turn into a message that names where the template came from."""
    return compile_template(template).render(**values)


def is_template(text: str) -> bool:
    """Whether a recipe value is a Jinja template rather than a plain name."""
    return "{{" in text or "{%" in text
