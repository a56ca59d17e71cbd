"""protect(..., global_shape=, offset=, replicated=): checked on the protecting rank,
stored in the rank file header, read back by RankFile (no MPI)."""
import struct
import zlib

import numpy as np
import pytest

from veloc.storage.rankfile import RankFile
from veloc.errors import CheckpointError, CorruptCheckpointError
from veloc.regions import Region
from conftest import write_vck


def test_layout_round_trips_through_the_header(tmp_path):
    grid = np.arange(12.0).reshape(3, 4)
    write_vck(tmp_path / "r0.vck", [Region("grid", grid, global_shape=(9, 4), offset=(3, 0)),
                                 Region("it", np.zeros(1, np.int64), replicated=True),
                                 Region("meta", {"a": 1}, use_pickle=True, replicated=True),
                                 Region("own", np.ones(2))])
    with RankFile(tmp_path / "r0.vck") as rf:
        g, it, meta, own = (rf.region(i) for i in ("grid", "it", "meta", "own"))
        assert (g.global_shape, g.global_offset, g.replicated, g.is_global) == ((9, 4), (3, 0), False, True)
        assert it.replicated and not it.is_global and meta.replicated
        assert (own.global_shape, own.replicated) == ((), False)
        np.testing.assert_array_equal(rf.as_array(g), grid)


@pytest.mark.parametrize("kwargs, words", [
    (dict(global_shape=(2, 4), offset=(0, 0)), "does not fit"),
    (dict(global_shape=(9, 4)), "go together"),
    (dict(offset=(0, 0)), "go together"),
    (dict(global_shape=(9, 4), offset=(0, 0), replicated=True), "not both"),
    (dict(global_shape=(9,), offset=(0,)), "dimension"),
    (dict(global_shape=(9, 4), offset=(0, -1)), "negative"),
    (dict(global_shape="ab", offset=(0, 0)), "tuple of ints"),
    (dict(global_shape=(9.5, 4), offset=(0, 0)), "tuple of ints"),
    (dict(replicated=1), "True or False"),
])
def test_bad_layouts_are_clear_errors(kwargs, words):
    with pytest.raises(CheckpointError, match=words):
        Region("grid", np.zeros((3, 4)), **kwargs)


def test_a_pickled_region_cannot_be_a_slab():
    with pytest.raises(CheckpointError, match="pickled object cannot be a slab"):
        Region("p", {"a": 1}, use_pickle=True, global_shape=(4,), offset=(0,))


def test_a_header_claiming_a_slab_outside_its_global_shape_is_corrupt(tmp_path):
    path = tmp_path / "r0.vck"
    write_vck(path, [Region("grid", np.zeros((3, 4)), global_shape=(9, 4), offset=(6, 0))])
    data = bytearray(path.read_bytes())
    at = data.index(b'"global_offset":[6,0]')
    data[at:at + len(b'"global_offset":[6,0]')] = b'"global_offset":[7,0]'
    length = struct.unpack_from("<I", data, 8)[0]
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[16:16 + length])))
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="outside its global shape"):
        RankFile(path)
