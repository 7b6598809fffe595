"""One option value: what YAML, the command line and keywords give becomes the field's
type, and a value outside its field's declared choices or range is refused by name."""

import math

import pytest

from edgezo.config.options import FIELDS
from edgezo.config.values import coerce_value, field_problems, normalize_dtype
from edgezo.errors import ConfigError


@pytest.mark.parametrize(("name", "hint", "given", "want"), [
    ("lr", float | None, "1e-5", 1e-5),
    ("steps", int, 12.0, 12),
    ("pair", bool | None, "yes", True),
    ("betas", tuple[float, float] | None, "0.9,0.99", (0.9, 0.99)),
    ("fo_blocks", list[str], "head, -1", ["head", "-1"]),
    ("dtype", str | None, "torch.bfloat16", "bf16"),
])
def test_values_become_their_fields_type(name, hint, given, want):
    assert coerce_value(name, given, hint) == want


@pytest.mark.parametrize(("name", "hint", "given"), [
    ("steps", int, 1.5), ("steps", int, True), ("lr", float, "fast"),
    ("betas", tuple[float, float], "0.9"), ("pair", bool, "maybe"),
])
def test_a_value_of_the_wrong_type_names_the_option(name, hint, given):
    with pytest.raises(ConfigError, match=f"option {name} takes"):
        coerce_value(name, given, hint)


def test_choices_and_ranges_are_checked_against_the_declaration():
    assert field_problems("lr", 1e-3, FIELDS["lr"].metadata) == []
    assert "must be >= 0" in field_problems("lr", -1.0, FIELDS["lr"].metadata)[0]
    assert "finite" in field_problems("lr", math.inf, FIELDS["lr"].metadata)[0]
    assert "must be < 1" in field_problems("sparsity", 1.0, FIELDS["sparsity"].metadata)[0]
    assert "unknown lr schedule" in field_problems("schedule", "steep",
                                                   FIELDS["schedule"].metadata)[0]
    assert "unknown optimizer 'zo-sdg'" in field_problems("optimizer", "zo-sdg",
                                                          FIELDS["optimizer"].metadata)[0]


def test_dtype_spellings():
    assert [normalize_dtype(v) for v in ("float16", "BFloat16", "torch.float32", None)] == \
        ["fp16", "bf16", "fp32", None]
