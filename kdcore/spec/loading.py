"""Loading specs from YAML and turning pydantic errors into one clear Problem per mistake."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdcore.errors import Problem, SpecError
from kdcore.losses.registry import kinds as loss_kinds
from kdcore.spec.losses import LossSpec, loss_union

M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning I/O and syntax errors into SpecError."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file not found: {p}", [Problem("", f"file not found: {p}", None, "check the path")])
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        reason = getattr(e, "problem", None) or str(e)
        raise SpecError("invalid YAML", [Problem("", f"invalid YAML at {where}: {reason}", None,
                                                 "fix the YAML syntax (indentation, colons, quotes)")], source=str(p))


def load_model(cls: type[M], path: str | Path) -> M:
    return validate_model(cls, load_yaml(path), source=str(path))


def validate_model(cls: type[M], data: Any, source: str | None = None) -> M:
    """Validate ``data`` as ``cls``; on failure raise SpecError listing every problem."""
    if not isinstance(data, dict):
        raise SpecError("spec must be a mapping", [Problem("", "the spec must be a YAML mapping of keys to values",
                                                           type(data).__name__, "start from an example in examples/")],
                        source=source)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = problems_from_validation(cls, e)
        raise SpecError(f"{len(problems)} problem(s) in the spec", problems, source=source) from None


def _dotted(loc: tuple) -> str:
    return ".".join(str(x) for x in loc)


def problems_from_validation(cls: type[BaseModel], err: ValidationError) -> list[Problem]:
    out: list[Problem] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        ctx = e.get("ctx") or {}
        if kind == "kd_cross_field":
            prefix = _dotted(_clean_loc(loc))
            for p in ctx["problems"]:
                path = f"{prefix}.{p.path}" if prefix and p.path else (prefix or p.path)
                out.append(Problem(path, p.message, p.value, p.fix))
            continue
        clean = _clean_loc(loc)
        tagged = tuple(x for x in loc if not (isinstance(x, str) and "[" in x))  # keeps the union tags
        path = _dotted(clean)
        value = e.get("input")
        if kind == "extra_forbidden":
            known = _fields_at(cls, tagged[:-1])
            key = str(clean[-1]) if clean else ""
            close = difflib.get_close_matches(key, known, n=1)
            fix = f"did you mean {close[0]!r}?" if close else (f"allowed keys: {', '.join(known)}" if known else "remove it")
            out.append(Problem(path, "unknown key", None, fix))
        elif kind == "missing":
            out.append(Problem(path, "required field is missing", None, about=_describe(cls, tagged)))
        elif kind in ("union_tag_invalid", "literal_error", "enum"):
            expected = ctx.get("expected_tags") or ctx.get("expected")
            got = ctx.get("tag", value)
            if kind == "union_tag_invalid":
                path = f"{path}.kind" if path else "kind"
            out.append(Problem(path, "not an allowed value", got, f"use one of {expected}"))
        elif kind == "union_tag_not_found":
            out.append(Problem(path, "missing 'kind'", None, f"add kind: one of {ctx.get('discriminator', '')}"))
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            shown = value if not isinstance(value, (dict, list)) else None
            out.append(Problem(path, msg[0].lower() + msg[1:] if msg else msg, shown, about=_describe(cls, tagged)))
    return out


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member tags (e.g. 'factory', 'function-after[...]') from a location."""
    tags = _TAGS | set(loss_kinds())
    return tuple(x for x in loc if not (isinstance(x, str) and ("[" in x or x in tags)))


# Union-member tags of the model and data sources; the loss kinds come from the loss table.
_TAGS = {"factory", "torchvision", "timm", "sklearn_digits", "npz", "parquet", "imagefolder"}


def _model_at(cls: type[BaseModel], loc: tuple) -> Any:
    """The model class (or union of classes) a location points into, best effort."""
    current: Any = cls
    for part in loc:
        current = _step(current, part)
        if current is None:
            return None
    return current


def _candidates(tp: Any) -> list[type[BaseModel]]:
    if tp is LossSpec:
        return _candidates(loss_union())
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _candidates(typing.get_args(tp)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out = []
        for a in typing.get_args(tp):
            out.extend(_candidates(a))
        return out
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _step(current: Any, part: Any) -> Any:
    if isinstance(part, int):
        origin = typing.get_origin(current)
        if origin is list:
            return typing.get_args(current)[0]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # an optional list
            for a in typing.get_args(current):
                if typing.get_origin(a) is list:
                    return typing.get_args(a)[0]
        return current
    models = _candidates(current)
    if len(models) > 1 and isinstance(part, str):  # a union member's tag: that member
        for m in models:
            kind = m.model_fields.get("kind")
            if kind is not None and typing.get_args(kind.annotation) == (part,):
                return m
    for m in models:
        if part in m.model_fields:
            return m.model_fields[part].annotation
    return None


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    target = _model_at(cls, loc)
    names: list[str] = []
    for m in _candidates(target) if target is not None else []:
        for n in m.model_fields:
            if n not in names:
                names.append(n)
    return names


def _describe(cls: type[BaseModel], loc: tuple) -> str | None:
    """The field's description, as the hint of how to fix it."""
    if not loc:
        return None
    parent = _model_at(cls, loc[:-1])
    for m in _candidates(parent) if parent is not None else []:
        f = m.model_fields.get(str(loc[-1]))
        if f is not None and f.description:
            return f.description[0].lower() + f.description[1:]
    return None
