"""Markdown reference of every config key, generated from the config model so it cannot drift."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import Config


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + (
            " or null" if type(None) in typing.get_args(annotation) else ""
        )
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "—" if isinstance(value, BaseModel) else f"`{value!r}`"
    return "`null`" if field.default is None else f"`{field.default!r}`" if field.default is not PydanticUndefined else ""


def _section_model(annotation) -> type[BaseModel] | None:
    """The section model inside an annotation (itself, or inside Optional, a Union or a list), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _section_model(argument)
        if found is not None:
            return found
    return None


def config_reference() -> str:
    """The whole reference as Markdown."""
    lines = ["# Config reference", "", "Generated from `pipeline/config.py` by `python scripts/gen_config_reference.py`; a test fails when it drifts.", ""]
    top = [(name, field) for name, field in Config.model_fields.items()]
    lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    sections = []
    for name, field in top:
        annotation = field.annotation
        section = _section_model(annotation)
        if section is not None and section not in [model for _, model in sections]:
            sections.append((name, section))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"| `{name}` | section | {_default(field)} | {annotation.__doc__.strip()} |")
        else:
            lines.append(f"| `{name}` | {_type_name(annotation)} | {_default(field)} | {field.description or ''} |")
    for name, model in sections:
        lines += ["", f"## `{name}`", "", model.__doc__.strip(), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            lines.append(f"| `{name}.{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    return "\n".join(lines) + "\n"
