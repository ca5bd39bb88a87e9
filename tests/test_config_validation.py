"""Every config value is checked when the config is built, before any data is read: an out-of-range value of
any field of TrainConfig or of any method's Config is a ConfigError naming the field, the value and the range."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepclust.backbones import BACKBONES
from deepclust.cli import main
from deepclust.config import (
    UNCHECKED,
    BackboneName,
    Choice,
    ConfigError,
    Device,
    Range,
    TrainConfig,
    field_types,
    resolve,
    rules,
)
from deepclust.methods import METHODS

# Data that does not exist: had resolve (or train, before its checks) read it, the error would be a DataError.
MISSING = "/nonexistent/deepclust-validation/none.npz"


def kind_of(cls: type, name: str) -> tuple[type, bool, bool]:
    """(scalar type, optional, a list) of a dataclass field."""
    kind = field_types(cls)[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is list:
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


def parses_as_device(text: str) -> bool:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        return False
    return True


def outside(rule: Range, kind: type) -> st.SearchStrategy:
    """Numbers outside ``rule``, drawn from its bounds alone (plus NaN and the infinities for floats)."""
    low_in, high_in = rule.ends[0] == "[", rule.ends[1] == "]"
    parts = []
    if kind is int:
        if rule.low != -math.inf:
            parts.append(st.integers(max_value=int(rule.low) - 1 if low_in else int(rule.low)))
        if rule.high != math.inf:
            parts.append(st.integers(min_value=int(rule.high) + 1 if high_in else int(rule.high)))
        return st.one_of(parts)
    parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if rule.low != -math.inf:  # (-0.0 is below 0.0 for hypothesis, not for Python: an included bound is dropped)
        parts.append(st.floats(max_value=rule.low, exclude_max=low_in, allow_nan=False, allow_infinity=False)
                     .filter(lambda v: not (low_in and v == rule.low)))
    if rule.high != math.inf:
        parts.append(st.floats(min_value=rule.high, exclude_min=high_in, allow_nan=False, allow_infinity=False)
                     .filter(lambda v: not (high_in and v == rule.high)))
    return st.one_of(parts)


# strings that coerce reads as "no value" (as the configs write "no cap"): not a wrong choice but an empty one
EMPTY = ("", "null", "~", "None", "none")
WORDS = st.text(min_size=1, max_size=10).filter(lambda v: v.strip() not in EMPTY)


def bad_values(rule, cls: type, name: str) -> st.SearchStrategy:
    kind, _, is_list = kind_of(cls, name)
    if isinstance(rule, Choice):
        return WORDS.filter(lambda v: v not in rule.values)
    if isinstance(rule, Device):
        return WORDS.filter(lambda v: v != "auto" and not parses_as_device(v))
    if isinstance(rule, BackboneName):  # none of ours, or a timm: name timm does not know
        return st.one_of(WORDS.filter(lambda v: v not in BACKBONES and not v.startswith("timm:")),
                         st.from_regex(r"timm:[a-z_]{1,8}9z", fullmatch=True))
    if is_list:  # one bad element among good ones
        good = st.floats(0.01, 0.99)
        return st.tuples(st.lists(good, max_size=2), outside(rule, kind), st.lists(good, max_size=2)).map(
            lambda t: [*t[0], t[1], *t[2]])
    return outside(rule, kind)


def names_the_field(message: str, name: str) -> bool:
    return message.startswith((f"{name} must be ", f"unknown {name} ", f"every value of {name} must be "))


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name in rules("npid")]
METHOD_FIELDS = [(m, f.name) for m, cls in METHODS.items() for f in dataclasses.fields(cls.Config)]


def check_refused(method: str, name: str, value, cls: type) -> None:
    layer = {"method": method, "data": MISSING, "test_data": MISSING, "out": "/nonexistent/out", name: value}
    with pytest.raises(ConfigError) as err:  # any other exception fails the test
        resolve([layer])
    message = str(err.value)
    assert names_the_field(message, name), message
    assert repr(value) in message, message  # the value as given (coerce keeps its type)
    rule = rules(method)[name]
    assert str(rule) in message, message  # and the valid range


@pytest.mark.parametrize("name", TRAIN_FIELDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_train_field_out_of_range_is_a_config_error_naming_it(name, data):
    method = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    value = data.draw(bad_values(rules(method)[name], TrainConfig, name), label=name)
    check_refused(method, name, value, TrainConfig)


@pytest.mark.parametrize("method, name", [c for c in METHOD_FIELDS if c[1] in rules(c[0])])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_method_field_out_of_range_is_a_config_error_naming_it(method, name, data):
    cls = METHODS[method].Config
    value = data.draw(bad_values(rules(method)[name], cls, name), label=name)
    check_refused(method, name, value, cls)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_has_a_rule_or_is_free_form(method):
    # a new field without a rule would escape the check: each is ranged, a choice, boolean, or a path
    table = rules(method)
    for cls in (TrainConfig, METHODS[method].Config):
        for f in dataclasses.fields(cls):
            kind, _, _ = kind_of(cls, f.name)
            assert f.name in table or kind is bool or f.name in UNCHECKED, (method, f.name)
    # and the defaults, with the method's YAML, pass their own rules
    resolve([{"method": method}])


@pytest.mark.parametrize("method, key, value, valid", [
    # the issue's list, at and beyond each boundary
    ("npid", "lr", -1.0, "above 0"), ("npid", "lr", 0.0, "above 0"),
    ("npid", "batch_size", 1, "at least 2"), ("npid", "momentum", 1.0, "in [0, 1)"),
    ("npid", "weight_decay", -0.001, "at least 0"), ("npid", "tau", 0.0, "above 0"),
    ("npid", "lr_decay", 0.0, "in (0, 1]"), ("npid", "lr_decay", 1.5, "in (0, 1]"),
    ("npid", "lr_decay_at", [0.5, 1.0], "in (0, 1)"), ("npid", "lr_decay_at", [0.0], "in (0, 1)"),
    ("npid", "bank_momentum", 0.0, "in (0, 1]"), ("npid", "bank_init", "zeros", "one of features, random"),
    ("pcp", "gamma", 0.0, "in (0, 1]"), ("pcp", "gamma", 1.01, "in (0, 1]"),
    ("pcp", "alpha", 0.0, "in (0, 1)"), ("pcp", "alpha", 1.0, "in (0, 1)"), ("pcp", "min_clusters", 1, "at least 2"),
    ("pad", "max_size", 0, "at least 2"), ("pad", "max_size", 1, "at least 2"), ("pad", "k", 0, "at least 1"),
    ("pad", "hpe", "fcs", "one of kl, cosine, false"),
    ("deepcluster", "k", 1, "at least 2"), ("odc", "k", 0, "at least 2"), ("uic", "k", 1, "at least 2"),
    ("odc", "dropout", 1.0, "in [0, 1)"), ("npid", "knn_k", 0, "at least 1"), ("npid", "epochs", 0, "at least 1"),
])
def test_the_issues_ranges(method, key, value, valid):
    with pytest.raises(ConfigError, match=rf"^(every value of |unknown )?{key}\b") as err:
        resolve([{"method": method, "data": MISSING, key: value}])
    assert valid in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("method, key, value", [
    ("pcp", "gamma", 1.0), ("npid", "momentum", 0.0), ("npid", "lr_decay", 1.0), ("npid", "bank_momentum", 1.0),
    ("pad", "max_size", None), ("pad", "max_size", 2), ("pad", "k", 1), ("deepcluster", "k", None),
    ("deepcluster", "k", 2), ("npid", "lr_decay_at", []), ("npid", "eval_every", 0), ("npid", "device", "cuda:1"),
    ("npid", "weight_decay", 0.0), ("pcp", "drop_below", -2.5),
])
def test_values_at_the_edges_of_their_ranges_are_kept(method, key, value):
    train, hparams = resolve([{"method": method, key: value}])
    assert getattr(train if hasattr(train, key) else hparams, key) == value


@pytest.mark.parametrize("pair, message", [("lr=-1", "lr must be above 0, got -1.0"),
                                           ("max_size=0", "max_size must be at least 2 (or none), got 0")])
def test_train_refuses_a_bad_value_before_reading_data_or_making_the_folder(tmp_path, capsys, pair, message):
    out = tmp_path / "o"
    rc = main(["train", "--method", "pad", "--data", MISSING, "--out", str(out), pair])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and MISSING not in err  # the data was never looked at
    assert not out.exists()
