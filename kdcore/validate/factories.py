"""Factory targets (``"package.module:function"``): they import, and their kwargs bind to the signature.

Binding is checked without calling anything: unknown keyword names (unless the function takes
``**kwargs``), required parameters left out, and values that do not fit a parameter's type annotation
(only annotations a YAML value can be checked against: bool, int, float, str, None, list/tuple/dict and
their element types, Literal, Optional/Union; anything else is taken on trust).
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import types
import typing
from typing import Any, Callable

from kdcore.validate.report import Report, first_line

_UNION_TYPES = (typing.Union, getattr(types, "UnionType", typing.Union))


def resolve(target: str, path: str, report: Report, what: str = "factory") -> Callable[..., Any] | None:
    """Import ``target``; on failure add a problem at ``path`` (the ``...target`` field) and return None."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        top = missing.split(".")[0]
        if missing == module_name or module_name.startswith(missing + "."):
            close = _close_module(module_name)
            fix = (f"did you mean {close!r}?" if close else
                   f"check the module path, or install the package that provides it (pip install {top})")
            report.add(path, f"{what} module {module_name!r} cannot be imported: no module named {missing!r}",
                       target, fix)
        else:
            report.add(path, f"{what} module {module_name!r} imports {missing!r}, which is not installed", target,
                       f"pip install {top} where the job runs (and here, to validate)")
        return None
    except Exception as e:  # noqa: BLE001 - importing user code may raise anything
        report.add(path, f"importing {what} module {module_name!r} fails: {first_line(e)}", target,
                   "fix the error in that module (or in what it imports)")
        return None
    done = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            fix = (f"did you mean {', '.join(repr(f'{done}:{c}') for c in close)}?" if close
                   else f"{done} has: {', '.join(sorted(names)[:12])}")
            report.add(path, f"{done!r} has no attribute {part!r}", target, fix)
            return None
        obj = getattr(obj, part)
        done = f"{done}.{part}" if ":" in done else f"{done}:{part}"
    if not callable(obj):
        report.add(path, f"{what} target is a {type(obj).__name__}, not a function or class", target,
                   "point target at a function (or class) that returns the object")
        return None
    return obj


def _close_module(name: str) -> str | None:
    """A close existing module name for a typo in the last component (``kdcore.zo`` -> ``kdcore.zoo``)."""
    parent, _, leaf = name.rpartition(".")
    if not parent:
        return None
    try:
        import pkgutil

        pkg = importlib.import_module(parent)
        names = [m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
    except Exception:  # noqa: BLE001 - only a hint
        return None
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    return f"{parent}.{close[0]}" if close else None


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], path: str, report: Report, label: str) -> bool:
    """Check that ``fn(**kwargs)`` binds; problems go to ``path.kwargs[.name]``. True when it binds."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature: nothing to check
        return True
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    ok = True
    for name, value in kwargs.items():
        p = params.get(name)
        if p is None or p.kind is p.POSITIONAL_ONLY:
            if takes_var_kw and p is None:
                continue
            close = difflib.get_close_matches(name, named, n=1, cutoff=0.6)
            fix = f"did you mean {close[0]!r}?" if close else (
                f"{label} takes {', '.join(named)}" if named else f"{label} takes no keyword arguments")
            report.add(f"{path}.kwargs.{name}", f"{label} has no parameter {name!r}", value, fix)
            ok = False
    for name, p in params.items():
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in kwargs:
            report.add(f"{path}.kwargs", f"{label} needs the argument {name!r}, which is not given", None,
                       f"add {name}: <value> under kwargs")
            ok = False
    hints = _hints(fn)
    for name, value in kwargs.items():
        p = params.get(name)
        if p is None or p.kind is p.POSITIONAL_ONLY:
            continue
        tp = hints.get(name, p.annotation)
        if tp is p.empty or isinstance(tp, str):
            continue
        if p.default is None and value is None:
            continue
        if not fits(value, tp):
            want = type_name(tp)
            report.add(f"{path}.kwargs.{name}", f"{label} expects {name}: {want}", value,
                       f"give {name} {_article(want)} {want} value" + _example(tp, value))
            ok = False
    return ok


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable string annotations: check what is not a string
        return {}


def fits(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits annotation ``tp``; unknown annotations are accepted."""
    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return fits(value, args[0])
    if origin in _UNION_TYPES:
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is complex:
        return isinstance(value, (int, float, complex)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    seq = origin or tp
    if seq in (list, tuple, collections.abc.Sequence, collections.abc.Iterable, set, frozenset,
               collections.abc.Collection):
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            return False
        if not args:
            return True
        if seq is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return all(fits(v, args[0]) for v in value)
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return all(fits(v, args[0]) for v in value)
    if seq in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
        return True
    if isinstance(tp, type) and tp in (list, dict, tuple, set):
        return isinstance(value, tp)
    return True  # a class YAML cannot express (torch.dtype, nn.Module, ...): the factory may convert


def type_name(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in _UNION_TYPES:
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{inner}]" if inner else base
    return getattr(tp, "__name__", str(tp))


def _example(tp: Any, value: Any) -> str:
    """A concrete hint for the usual slip: a number written as a word or quoted."""
    if tp in (int, float) and isinstance(value, str):
        try:
            float(value)
            return " (write the number without quotes)"
        except ValueError:
            return " (a number, e.g. 4)"
    return ""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
