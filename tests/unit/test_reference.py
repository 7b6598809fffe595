"""The generated references match the code, and the README stays a front door."""


import pytest
from conftest import REPO

from edgezo import reference
from edgezo.config.options import FIELDS, RESUMABLE
from edgezo.tasks.make import TASKS
from edgezo.zo.methods import OPTIMIZERS

ROOT = REPO


@pytest.mark.parametrize("name", list(reference.REFERENCES))
def test_the_generated_references_are_current(name):
    written = (reference.DOCS / name).read_text(encoding="utf-8")
    assert written == reference.REFERENCES[name](), (
        f"docs/{name} is stale: run `python -m edgezo.reference`")


def test_the_references_name_every_option_method_and_resumable_option():
    options, methods = reference.options_reference(), reference.methods_reference()
    assert all(f"`{name}`" in options for name in FIELDS)
    assert all(f"`{name}`" in methods for name in OPTIMIZERS)
    resumable = options.split("What `--resume` may change")[1]
    assert all(reference._flag(name) in resumable for name in RESUMABLE)


def test_the_option_helps_name_every_registered_choice():
    # --task and --optimizer list names in their help; a new entry must show there
    assert all(task in FIELDS["task"].metadata["help"] for task in TASKS)
    assert all(name in FIELDS["optimizer"].metadata["help"] for name in OPTIMIZERS)


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    assert lines[3].startswith("bash scripts/run.sh")
    assert lines[4].startswith("bash scripts/test.sh")


def test_every_measured_default_names_a_source_that_exists():
    import re

    from edgezo.config.defaults import MEASURED
    from edgezo.models.catalog import SCHEMES

    rows = [*MEASURED["learning_rates"], *MEASURED["eps"].values(), MEASURED["scales_g_clip"]]
    headings = "\n".join(line for line in (ROOT / "BENCHMARKS.md").read_text().splitlines()
                         if line.startswith("#"))
    for row in MEASURED["learning_rates"]:
        assert row["optimizer"] in OPTIMIZERS and row["scheme"] in SCHEMES
    for row in rows:
        source = row["source"]
        cited = re.match(r'BENCHMARKS\.md, "([^"]+)"', source)
        if cited:
            assert cited.group(1) in headings, source
        else:
            assert (ROOT / source.split(":")[0]).is_file(), source
