"""Names are never paths."""
import pytest

from veloc.errors import CheckpointError
from veloc.names import check_file_name, check_name, check_region_id, check_version


@pytest.mark.parametrize("name", ["heat", "a.b_c", "X9", "_x"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "a\0b", "x" * 201, 5, None])
def test_bad_names(name):
    with pytest.raises(CheckpointError):
        check_name(name)


def test_versions_and_ids():
    assert check_version(3) == 3
    for bad in (-1, 1.5, "3", True, None):
        with pytest.raises(CheckpointError):
            check_version(bad)
    assert check_region_id(0) == 0 and check_region_id("grid") == "grid"
    for bad in (-1, "a/b", 1.0, False, ("t",)):
        with pytest.raises(CheckpointError):
            check_region_id(bad)


def test_routed_file_names():
    assert check_file_name("heat-0.dat") == "heat-0.dat"
    for bad in ("", "..", ".x", "-rf", "a/b"):
        with pytest.raises(CheckpointError):
            check_file_name(bad)
