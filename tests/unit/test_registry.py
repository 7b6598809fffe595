"""The registry of names: an entry a module registers is found by its name, in order; an
unknown name is the user's error, listing the valid ones."""

import pytest

from edgezo.errors import ConfigError
from edgezo.registry import OPTIMIZERS, QUANTIZATIONS, SCHEMES, TASKS, Registry


def test_entries_keep_their_order_and_a_name_is_registered_once():
    reg = Registry("colour")
    reg.add("red", 1)
    reg.add("blue", 2)
    assert list(reg) == ["red", "blue"] and reg["blue"] == 2 and len(reg) == 2
    assert "red" in reg and "green" not in reg and reg.get("green") is None
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("red", 3)


def test_an_unknown_name_lists_the_valid_ones():
    reg = Registry("colour")
    reg.add("red", 1)
    with pytest.raises(ConfigError, match=r"unknown colour 'rde'; valid colours: red"):
        reg["rde"]


def test_the_config_fills_every_registry_it_validates_against():
    import edgezo.config  # noqa: F401  (importing the config loads the catalogs)
    import edgezo.tasks.make  # noqa: F401

    assert {"zo-sgd", "fzoo", "fo-adam"} <= set(OPTIMIZERS)
    assert set(SCHEMES) == {"full", "lora", "prefix", "prompt", "head", "scales"}
    assert "nf4" in QUANTIZATIONS and "squad" in TASKS
