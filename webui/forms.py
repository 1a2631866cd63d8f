"""A backend's settings form, generated from its pydantic Settings class.

``fields_of`` turns the schema into plain ``FieldSpec``s (testable without Gradio);
``build_components`` makes one Gradio component per field with the field's description as
help; ``collect`` turns the components' values back into a settings dict.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretStr

from moechat.backends.api import operator_only_fields

# Fields the page shows elsewhere (the model folder has its own picker, shared by every backend).
SHARED_FIELDS = ("model",)


@dataclass
class FieldSpec:
    name: str
    kind: str                      # bool | int | float | choice | text | secret | json
    label: str
    default: Any
    help: str = ""
    optional: bool = False         # None is allowed: an empty box means None
    choices: list[Any] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return annotation, optional
    return annotation, False


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        for attr in ("ge", "gt"):
            if getattr(m, attr, None) is not None:
                lo = getattr(m, attr)
        for attr in ("le", "lt"):
            if getattr(m, attr, None) is not None:
                hi = getattr(m, attr)
    return lo, hi


def fields_of(settings_cls: type[BaseModel], skip: tuple[str, ...] = SHARED_FIELDS) -> list[FieldSpec]:
    """The form's fields: every setting but those in ``skip`` and the operator-only ones (those
    come from ``moechat serve --set`` only, never from the page)."""
    specs = []
    fixed = operator_only_fields(settings_cls)
    for name, info in settings_cls.model_fields.items():
        if name in skip or name in fixed:
            continue
        annotation, optional = _unwrap_optional(info.annotation)
        default = info.get_default(call_default_factory=True)
        label = name.replace("_", " ").capitalize()
        help_text = info.description or ""
        lo, hi = _bounds(info.metadata)
        origin = typing.get_origin(annotation)
        if annotation is bool:
            spec = FieldSpec(name, "bool", label, bool(default), help_text, optional)
        elif origin is typing.Literal:
            spec = FieldSpec(name, "choice", label, default, help_text, optional, list(typing.get_args(annotation)))
        elif annotation is int:
            spec = FieldSpec(name, "int", label, default, help_text, optional, minimum=lo, maximum=hi)
        elif annotation is float:
            spec = FieldSpec(name, "float", label, default, help_text, optional, minimum=lo, maximum=hi)
        elif annotation is str:
            spec = FieldSpec(name, "text", label, default or "", help_text, optional)
        elif annotation is SecretStr:
            # write-only: the form starts empty and never shows a value, not even the default
            spec = FieldSpec(name, "secret", label, "", help_text, optional)
        else:
            spec = FieldSpec(name, "json", label, default, help_text + " (JSON)" if help_text else "JSON", optional)
        specs.append(spec)
    return specs


def to_setting(spec: FieldSpec, value: Any) -> Any:
    """One component value as the setting's value. Empty optional boxes become None; whole
    numbers typed into an int field become ints; JSON fields are parsed (a sentence if not)."""
    if spec.kind == "secret":
        return (value or "").strip()
    if value is None or (isinstance(value, str) and not value.strip() and spec.kind != "text"):
        return None if spec.optional else spec.default
    if spec.kind in ("int", "float") and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{spec.label} must be a number, or empty for automatic; got {value.strip()!r}.") from None
    if spec.kind == "int" and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{spec.label} must be a whole number; got {value:g}.")
        return int(value)
    if spec.kind == "json" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{spec.label} is not valid JSON ({exc}).") from exc
    if spec.kind == "text" and spec.optional and value == "":
        return None
    return value


def to_component(spec: FieldSpec, value: Any) -> Any:
    """A setting's value as its component shows it (the inverse of ``to_setting``); a secret
    never: its box stays empty, and says whether a value is set."""
    if spec.kind == "secret":
        return secret_box(bool(value.get_secret_value() if isinstance(value, SecretStr) else value))
    if spec.kind == "json":
        return "" if value is None else json.dumps(value)
    if spec.kind in ("int", "float") and spec.optional:
        return "" if value is None else str(value)
    if spec.kind == "text":
        return value or ""
    return spec.default if value is None else value


def secret_box(is_set: bool) -> Any:
    """A secret's box: always empty; its placeholder says whether the loaded model has a value."""
    import gradio as gr
    return gr.update(value="", placeholder=SECRET_SET if is_set else SECRET_EMPTY)


SECRET_SET = "set (hidden); leave empty to keep it, or type a new one"
SECRET_EMPTY = "not set; type it here (it is never shown again)"


def collect(specs: list[FieldSpec], values: list[Any]) -> dict[str, Any]:
    return {spec.name: to_setting(spec, value) for spec, value in zip(specs, values, strict=True)}


def build_components(specs: list[FieldSpec], elem_prefix: str = "") -> list[Any]:
    """One Gradio component per field, in the current Blocks context."""
    import gradio as gr

    comps = []
    for spec in specs:
        common = dict(label=spec.label, info=spec.help or None,
                      elem_id=f"{elem_prefix}{spec.name}" if elem_prefix else None)
        if spec.kind == "bool":
            comps.append(gr.Checkbox(value=spec.default, **common))
        elif spec.kind == "choice":
            comps.append(gr.Dropdown(choices=spec.choices, value=spec.default, **common))
        elif spec.kind in ("int", "float") and spec.optional:
            # an empty box means "automatic" (None); gr.Number cannot show empty
            comps.append(gr.Textbox(value="" if spec.default is None else str(spec.default), max_lines=1,
                                    placeholder="empty: automatic", **common))
        elif spec.kind in ("int", "float"):
            comps.append(gr.Number(value=spec.default, minimum=spec.minimum, maximum=spec.maximum,
                                   precision=0 if spec.kind == "int" else None, **common))
        elif spec.kind == "text":
            comps.append(gr.Textbox(value=spec.default, max_lines=1, **common))
        elif spec.kind == "secret":
            comps.append(gr.Textbox(value="", type="password", max_lines=1, placeholder=SECRET_EMPTY, **common))
        else:
            comps.append(gr.Textbox(value="" if spec.default is None else json.dumps(spec.default), **common))
    return comps
