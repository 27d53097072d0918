"""Templates over a row's columns: ``"{title}: {body}"`` for the text to embed, and the
summary prompt. Python's ``str.format`` syntax, whole column names only; ``{{`` and ``}}``
are literal braces; NULL renders as "".

The database keeps, per template, the columns it uses in order of first appearance
(``autoembed._template_columns``) and reads their values in that order, so a template is
rendered by position: a renamed column is followed.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from .errors import PromptError


def fields(template: str) -> list[str]:
    """The column names a template uses, in order of first appearance."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PromptError(f"template is malformed ({exc}); write braces as {{{{ }}}}") from exc
    out: list[str] = []
    for _literal, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if not name or any(c in name for c in ".[]"):
            raise PromptError(f"template placeholder {{{name}}} must name a column")
        if name not in out:
            out.append(name)
    if not out:
        raise PromptError("template uses no column")
    return out


def render(template: str, values: Sequence[str | None]) -> str:
    """The template with each placeholder replaced by the value at its position."""
    names = fields(template)
    if len(values) != len(names):
        raise PromptError(f"template uses {len(names)} column(s) but {len(values)} were read")
    by_name = {n: ("" if v is None else v) for n, v in zip(names, values, strict=True)}
    try:
        return template.format_map(by_name)
    except (ValueError, KeyError, IndexError) as exc:
        raise PromptError(f"template {template!r}: {exc}") from exc
