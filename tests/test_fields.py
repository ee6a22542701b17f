"""lm.fields: typed dataclasses from YAML/JSON/command-line values (the config's and the sweep space's builder)."""

from __future__ import annotations

import pytest

from lm.fields import ConfigError, coerce


@pytest.mark.parametrize(
    "value, annotation, expected",
    [
        ("2e6", int, 2_000_000),
        (2e6, int, 2_000_000),
        ("-3", int, -3),
        ("1_000", int, 1000),
        ("3e-4", float, 3e-4),
        (3, float, 3.0),
        ("YES", bool, True),
        ("0", bool, False),
        ("~", int | None, None),
        ("none", float | None, None),
        (None, str | None, None),
        (5, str, "5"),
    ],
)
def test_coerce_accepts(value, annotation, expected):
    result = coerce(value, annotation, "here")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    "value, annotation",
    [
        ("2.5", int),
        (2.5, int),
        (True, int),
        ("abc", int),
        ("abc", float),
        (True, float),
        ("maybe", bool),
        (1, bool),
        (None, int),
        ("null", int),
        ([1], str),
        (True, str),
    ],
)
def test_coerce_rejects(value, annotation):
    with pytest.raises(ConfigError, match="here"):
        coerce(value, annotation, "here")
