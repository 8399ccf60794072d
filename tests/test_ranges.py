"""Every numeric config key has a valid range, checked when the config loads (issue 15, defects 7-10)."""

import dataclasses
import math
import typing

import pytest

from stamp_dist.config import StampConfig, load_config
from stamp_dist.errors import StampError
from stamp_dist.ranges import RANGES


def numeric_keys(cls=StampConfig, prefix="") -> dict[str, tuple[type, bool]]:
    """Every int/float field of the config by dotted key: (number type, whether it holds a list)."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            found |= numeric_keys(t, f"{prefix}{f.name}.")
            continue
        args = {t} | set(typing.get_args(t))
        args |= {x for a in list(args) for x in typing.get_args(a)}
        number = {a for a in args if a in (int, float)}
        if number:
            is_list = any(typing.get_origin(a) is list for a in args)
            found[f"{prefix}{f.name}"] = (float if float in number else int, is_list)
    return found


def test_every_numeric_key_has_a_range():
    keys = numeric_keys()
    assert len(keys) > 60
    assert sorted(set(keys) - set(RANGES)) == []  # a new numeric key needs its range in stamp_dist/ranges.py
    assert sorted(set(RANGES) - set(keys)) == []  # no range for a key that does not exist


def _outside(key: str) -> str:
    """An override value just outside ``key``'s range."""
    r, (kind, is_list) = RANGES[key], numeric_keys()[key]
    if r.lo is not None:
        bad = r.lo if r.lo_open else r.lo - (1 if kind is int else 0.5)
    else:
        bad = r.hi if r.hi_open else r.hi + 1
    bad = int(bad) if kind is int else float(bad)
    return f"[{bad}]" if is_list else str(bad)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_value_outside_the_range_is_refused_naming_the_key(key):
    """One bad-input kind per numeric key (this covers the issue's val_every=0, checkpoint_every=0,
    val_tasks=0, finetune.batch_size=0, meta.steps=0, meta.meta_batch=0, k_shot/q_query/tau=0,
    prune.samples_per_class=0 …)."""
    with pytest.raises(StampError, match=f"'{key}'") as e:
        load_config(None, [f"{key}={_outside(key)}"])
    assert "must be" in str(e.value)


@pytest.mark.parametrize("override", ["meta.steps=-5", "meta.lr=nan", "finetune.lr=nan", "meta.tau=inf",
                                      "prune.budget=nan", "meta.inner_lr=-inf", "model.width=100000",
                                      "meta.encoder_dim=1000000", "seed=-1"])
def test_nonsense_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(StampError, match=f"'{key}'"):
        load_config(None, [override])


def test_floats_must_be_finite_and_the_message_says_so():
    with pytest.raises(StampError, match="'meta.lr' is nan; it must be a finite number > 0"):
        load_config(None, ["meta.lr=nan"])
    assert math.isfinite(load_config(None, ["meta.lr=0.5"]).meta.lr)


def test_encoder_heads_must_divide_the_encoder_width():
    with pytest.raises(StampError, match="multiple of meta.encoder_heads"):
        load_config(None, ["meta.encoder_dim=10", "meta.encoder_heads=4"])
