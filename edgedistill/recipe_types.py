"""How plain YAML values become the recipe's typed fields: every field's type is checked (and only converted where
YAML is ambiguous, as with ``1e-4``), unknown keys are refused with the nearest one suggested.

``RecipeError`` lives here because this is the first code that raises it; everyone imports it from ``recipe``.
"""
import dataclasses
import difflib
import math
import typing


class RecipeError(ValueError):
    """A recipe (or an override) is invalid; the message says which key and what would be valid."""


def unknown_key_message(dotted: str, part: str, names, prefix: str) -> str:
    close = difflib.get_close_matches(part, list(names), n=3, cutoff=0.5)
    where = f"in section {prefix!r}" if prefix else "at the top level"
    hint = ""
    if close:
        full = [f"{prefix}.{c}" if prefix else c for c in close]
        hint = f" Did you mean {full[0]!r}?" if len(full) == 1 else f" Did you mean one of {full}?"
    return f"Unknown recipe key {dotted!r} {where}.{hint} Valid keys: {sorted(names)}"


def expand_presets(raw: dict, presets: dict):
    """Replace, in place, each section given as a name (``loss: dkd``) by a copy of that preset's mapping.

    Args:
        raw: the recipe's top-level mapping.
        presets: section -> preset name -> the section's mapping, e.g. ``{"loss": losses.presets.LOSS_PRESETS}``.
    """
    for section, table in presets.items():
        name = raw.get(section)
        if not isinstance(name, str):
            continue
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Recipe key {section!r} is {name!r}, which is not a {section} preset.{hint} Presets: "
                              f"{list(table)}; or give the section as a mapping, e.g. {section}: {{...}}")
        raw[section] = dict(table[name])


def section_type(tp):
    """The dataclass behind a field type (unwrapping Optional), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def build(cls, raw, prefix: str):
    """Recursively turn a mapping into dataclass ``cls``; an unknown key or a wrong type is a RecipeError naming it."""
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe section {prefix or 'top level'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RecipeError(unknown_key_message(dotted, str(key), names, prefix))
        kwargs[key] = coerce(hints[key], value, dotted)
    return cls(**kwargs)


def coerce(tp, value, dotted: str):
    sub = section_type(tp)
    if sub is not None:
        if value is None and type(None) in typing.get_args(tp):
            return None
        return build(sub, value if value is not None else {}, dotted)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:  # a single value stands for a one-item list: export.formats=onnx
        return tuple(coerce(args[0], v, dotted) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"Recipe key {dotted!r} must be a list, got {value!r}")
        return [coerce(args[0], v, dotted) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"Recipe key {dotted!r} must be a mapping, got {value!r}")
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int, float)):
                raise RecipeError(f"Recipe key {dotted!r} must have text keys, got {k!r} (quote it in YAML)")
            out[str(k)] = coerce(args[1], v, f"{dotted}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"Recipe key {dotted!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"Recipe key {dotted!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        return as_float(value, dotted)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RecipeError(f"Recipe key {dotted!r} must be a string, got {value!r}")
        return str(value)
    return value  # typing.Any: passed on as YAML gave it


def as_float(value, dotted: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"Recipe key {dotted!r} must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > 1e300 or not math.isfinite(value):
        raise RecipeError(f"Recipe key {dotted!r} must be a finite number, got {value!r}")
    return float(value)
