"""Every shipped profile loads; bad files name the field and the file."""

import pytest

from edgezo.device.profiles import GiB, list_profiles, load_profile
from edgezo.errors import ProfileError

REQUIRED = {"4gb-gpu", "8gb-gpu", "12gb-gpu", "16gb-gpu", "24gb-gpu", "jetson-orin-8gb",
            "rtx4090-24gb", "a100-80gb", "h100-80gb", "cpu-16gb"}


def test_required_profiles_ship():
    assert set(list_profiles()) >= REQUIRED


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_loads(name):
    p = load_profile(name)
    assert p.name == name
    assert 0 < p.budget_bytes < p.device_memory_bytes


def test_budget_is_memory_less_headroom():
    p = load_profile("8gb-gpu")
    assert p.device_memory_bytes == 8 * GiB
    assert p.budget_bytes == int(8 * GiB * (1 - p.headroom))


def write(tmp_path, text):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


GOOD = """name: mine
device: cuda
device_memory_gb: 6
host_memory_gb: 16
host_device_bandwidth_gbps: 12
dtype: bf16
headroom: 0.1
"""


def test_user_profile_by_path(tmp_path):
    assert load_profile(write(tmp_path, GOOD)).device_memory_bytes == 6 * GiB


def test_missing_and_wrong_fields_are_all_reported_with_the_file(tmp_path):
    text = GOOD.replace("device_memory_gb: 6\n", "").replace("headroom: 0.1", "headroom: lots")
    path = write(tmp_path, text + "colour: blue\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert path in msg
    assert "missing field 'device_memory_gb'" in msg
    assert "field 'headroom' must be" in msg
    assert "unknown field 'colour'" in msg


@pytest.mark.parametrize("bad, needle", [
    ("dtype: bf16", "field 'dtype' must be one of"),
    ("device: cuda", "field 'device' must be one of"),
    ("headroom: 0.1", "field 'headroom' must be in [0, 1)"),
    ("device_memory_gb: 6", "field 'device_memory_gb' must be > 0"),
])
def test_invalid_values(tmp_path, bad, needle):
    replacement = {"dtype: bf16": "dtype: int3", "device: cuda": "device: tpu",
                   "headroom: 0.1": "headroom: 1.5",
                   "device_memory_gb: 6": "device_memory_gb: -1"}[bad]
    with pytest.raises(ProfileError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        load_profile(write(tmp_path, GOOD.replace(bad, replacement)))


def test_boolean_is_not_a_number(tmp_path):
    with pytest.raises(ProfileError, match="host_memory_gb"):
        load_profile(write(tmp_path, GOOD.replace("host_memory_gb: 16", "host_memory_gb: true")))


def test_unknown_name_lists_valid_profiles():
    with pytest.raises(ProfileError, match="valid profiles: .*8gb-gpu"):
        load_profile("9gb-gpu")


def test_not_yaml(tmp_path):
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(write(tmp_path, "name: [unclosed\n"))
