"""Any value for any recipe key gives a valid Recipe or a RecipeError naming that key, never another exception."""
import dataclasses
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedistill.recipe import Recipe, RecipeError, load_recipe, section_type


def recipe_keys(cls=Recipe, prefix=""):
    """(dotted key, field, type) for every key, sections included, of every section, the optional ones too."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        yield dotted, f, hints[f.name]
        if section_type(hints[f.name]) is not None:
            yield from recipe_keys(section_type(hints[f.name]), dotted)


KEYS = sorted(key for key, _, _ in recipe_keys())
RANGED = [(key, f.metadata["range"], tp) for key, f, tp in recipe_keys() if "range" in f.metadata]
NUMERIC = (int, float, tuple[int, ...], tuple[float, ...], dict[str, float])

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "{c}", "{x}", "a {c.y}", "{0}", "1e-4", "inf", "default", "ünï©ødé ☃"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6) | st.integers() | st.none(), inner, max_size=4),
                      max_leaves=8)
# 12 examples for each of the ~130 keys: ~1,500 per test, the same ones every run (derandomize), in about 5 s.
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def outcome(key: str, value_text: str):
    """load_recipe on quickstart with ``key=value_text``: the Recipe, or the RecipeError's message (asserted to name
    the key). Any other exception fails the test."""
    try:
        return load_recipe("quickstart", [f"{key}={value_text}"])
    except RecipeError as e:
        assert key in str(e), f"{key}={value_text!r} gave a RecipeError that does not name the key: {e}"
        return str(e)


@pytest.mark.parametrize("key", KEYS)
@PROPERTY
@given(value=VALUES)
def test_any_value_is_a_recipe_or_a_recipe_error_naming_the_key(key, value):
    result = outcome(key, yaml.safe_dump(value, default_flow_style=True, allow_unicode=True))
    if isinstance(result, Recipe):  # nan and inf are refused for every float key (model_kwargs go to timm as given)
        plain = result.to_dict()
        plain["student"].pop("model_kwargs")
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in leaves(plain))


@pytest.mark.parametrize("key", KEYS)
@PROPERTY
@given(text=st.text(max_size=20) | st.sampled_from(["[1", "{a: 1", "a: b: c", "'x", "2024-02-30", "!!float x",
                                                    "!!python/name:os.system", "\x00", "&a [*a]", "- a\n b"]))
def test_any_override_text_is_a_recipe_or_a_recipe_error_naming_the_key(key, text):
    outcome(key, text)


def leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v)
    else:
        yield obj


def test_every_numeric_field_declares_its_range():
    missing = [key for key, f, tp in recipe_keys() if tp in NUMERIC and "range" not in f.metadata]
    assert not missing, f"numeric recipe keys without a declared range (use num(default, ge=..., ...)): {missing}"
    assert len(RANGED) > 60  # the walk really reached every section


def outside(bounds: dict, kind) -> list:
    """One value just outside each declared bound (an int for an int key), or nan where no bound is set."""
    step = 1 if kind is int else 0.5
    beyond = {">=": lambda b: b - step, ">": lambda b: b, "<=": lambda b: b + step, "<": lambda b: b}
    return [beyond[op](b) for op, b in bounds.items()] or [float("nan")]


@pytest.mark.parametrize("key, bounds, tp", RANGED, ids=[key for key, _, _ in RANGED])
def test_every_declared_range_is_enforced(key, bounds, tp):
    kind = int if int in (tp, *typing.get_args(tp)) else float
    for bad in outside(bounds, kind):
        value = {"x": bad} if typing.get_origin(tp) is dict else [1, bad] if typing.get_origin(tp) is tuple else bad
        with pytest.raises(RecipeError, match="must be") as e:
            load_recipe("quickstart", [f"{key}={yaml.safe_dump(value, default_flow_style=True)}"])
        assert key in str(e.value)
