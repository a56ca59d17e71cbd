"""Unit tests of veloc.redundancy.erasure_codec (no MPI): every backend that loads here.

The erasure module (sync-mode leader or active backend) relies on these properties:
bit-exact rebuild from any k of k + m blocks, parity as long as the data, clear errors.
"""
import itertools

import numpy as np
import pytest

from veloc.redundancy import erasure_codec as ec
from veloc.errors import CheckpointError, ConfigError, RestartError

STRIPE = 4096  # small stripes so short test blocks still cross stripe boundaries
LENGTHS = (1, 4097, 3 * STRIPE + 123)


def _require(backend):
    if backend == "zfec":
        pytest.importorskip("zfec")
    if backend == "isal" and backend not in ec.available_backends("rs"):
        pytest.skip("libisal not found (neither system isa-l nor the pyeclib wheel)")


RS_BACKENDS = [pytest.param(b, id=b) for b in ec.BACKENDS["rs"]]
ALL_BACKENDS = ["numpy-xor", *ec.BACKENDS["rs"]]
CASES = ([pytest.param("xor", k, 1, "numpy-xor", id=f"xor-k{k}") for k in (2, 3, 4)]
         + [pytest.param("rs", k, m, b, id=f"rs-k{k}-m{m}-{b}")
            for (k, m) in ((4, 2), (3, 1), (5, 3)) for b in ec.BACKENDS["rs"]])


def _data(k, n, seed=0):
    rng = np.random.default_rng(seed + 1000 * k + n)
    return [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]


def _codec(scheme, k, m, backend, stripe=STRIPE):
    _require(backend)
    return ec.make_codec(scheme, k, m, backend=backend, stripe=stripe)


@pytest.mark.parametrize("scheme,k,m,backend", CASES)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_every_loss_pattern(scheme, k, m, backend, n):
    codec = _codec(scheme, k, m, backend)
    assert (codec.scheme, codec.k, codec.m, codec.backend) == (scheme, k, m, backend)
    data = _data(k, n)
    parity = codec.encode(data)
    assert len(parity) == m
    assert all(p.dtype == np.uint8 and p.shape == (n,) for p in parity)
    blocks = data + parity
    for r in range(m + 1):
        for lost in itertools.combinations(range(k + m), r):
            got = codec.decode({i: b for i, b in enumerate(blocks) if i not in lost}, n)
            assert len(got) == k
            for i in range(k):
                assert np.array_equal(got[i], data[i]), (lost, i)


@pytest.mark.parametrize("scheme,k,m,backend", CASES)
def test_too_many_losses(scheme, k, m, backend):
    codec = _codec(scheme, k, m, backend)
    data = _data(k, 4097)
    blocks = data + codec.encode(data)
    for lost in itertools.combinations(range(k + m), m + 1):
        with pytest.raises(ec.ErasureDecodeError, match=f"need {k}"):
            codec.decode({i: b for i, b in enumerate(blocks) if i not in lost}, 4097)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_buffer_types_out_and_views(backend):
    scheme, m = ("xor", 1) if backend == "numpy-xor" else ("rs", 2)
    codec = _codec(scheme, 4, m, backend)
    data = _data(4, 8 * 1001)
    mixed = [data[0].tobytes(), bytearray(data[1].tobytes()), memoryview(data[2]),
             data[3].view(np.float64)]
    parity = codec.encode(mixed)
    out = [np.full(8 * 1001, 7, dtype=np.uint8) for _ in range(m)]
    assert codec.encode(data, out=out) is out
    assert all(np.array_equal(a, b) for a, b in zip(out, parity))
    got = codec.decode({0: None, 1: mixed[1], 2: mixed[2], 3: mixed[3], 4: parity[0].tobytes()}, 8 * 1001)
    assert all(np.array_equal(g, d) for g, d in zip(got, data))
    assert np.shares_memory(got[3], data[3])  # present blocks come back as views
    with pytest.raises(ec.ErasureEncodeError, match="out must be"):
        codec.encode(data, out=[np.empty(10, dtype=np.uint8)] * m)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unequal_lengths_are_refused(backend):
    scheme, m = ("xor", 1) if backend == "numpy-xor" else ("rs", 2)
    codec = _codec(scheme, 3, m, backend)
    data = _data(3, 100)
    with pytest.raises(ec.ErasureEncodeError, match="equal length") as err:
        codec.encode([data[0], data[1][:99], data[2]])
    assert isinstance(err.value, CheckpointError)
    with pytest.raises(ec.ErasureEncodeError, match="3 data blocks"):
        codec.encode(data[:2])
    parity = codec.encode(data)
    with pytest.raises(ec.ErasureDecodeError, match="data block 1 has 99 bytes") as err:
        codec.decode({0: data[0], 1: data[1][:99], 3: parity[0]}, 100)
    assert isinstance(err.value, RestartError)
    with pytest.raises(ec.ErasureDecodeError, match="parity block 3 has 101 bytes"):
        codec.decode({0: data[0], 1: data[1], 3: np.zeros(101, np.uint8)}, 100)
    with pytest.raises(ec.ErasureDecodeError, match="outside"):
        codec.decode({0: data[0], 1: data[1], 9: parity[0]}, 100)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_blocks(backend):
    scheme, m = ("xor", 1) if backend == "numpy-xor" else ("rs", 2)
    codec = _codec(scheme, 3, m, backend)
    parity = codec.encode([b"", b"", b""])
    assert [p.size for p in parity] == [0] * m
    assert [g.size for g in codec.decode({1: b"", 2: b"", 3: parity[0]}, 0)] == [0, 0, 0]


@pytest.mark.parametrize("backend", RS_BACKENDS)
def test_rs_is_mds_for_larger_groups(backend):
    """Every loss pattern of up to m blocks decodes (isa_l_rs_vand-style matrices fail this)."""
    codec = _codec("rs", 8, 4, backend)
    data = _data(8, 77)
    blocks = data + codec.encode(data)
    for lost in itertools.combinations(range(12), 4):
        got = codec.decode({i: b for i, b in enumerate(blocks) if i not in lost}, 77)
        assert all(np.array_equal(g, d) for g, d in zip(got, data)), lost


@pytest.mark.parametrize("backend", RS_BACKENDS)
def test_rs_wide_group(backend):
    codec = _codec("rs", 100, 4, backend)
    data = _data(100, 333)
    blocks = data + codec.encode(data)
    lost = (0, 37, 99, 101)
    got = codec.decode({i: b for i, b in enumerate(blocks) if i not in lost}, 333)
    assert all(np.array_equal(g, d) for g, d in zip(got, data))


def test_isal_parity_matches_pyeclib_isa_l_rs_cauchy():
    """isal's parity files are what pyeclib's isa_l_rs_cauchy computes (payload, no header)."""
    _require("isal")
    pyeclib_iface = pytest.importorskip("pyeclib.ec_iface")
    k, m, n = 5, 3, 1000
    data = _data(k, n)
    parity = ec.make_codec("rs", k, m, backend="isal").encode(data)
    frags = pyeclib_iface.ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy").encode(np.concatenate(data))
    for j in range(m):
        assert frags[k + j][-n:] == parity[j].tobytes()


def test_default_backends():
    assert ec.make_codec("xor", 4).backend == "numpy-xor"
    rs = ec.make_codec("rs", 4, 2)
    assert rs.backend == ec.available_backends("rs")[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="raid5", k=4), "scheme='raid5' is not one of: xor, rs"),
    (dict(scheme="xor", k=1), "k=1 must be an integer >= 2"),
    (dict(scheme="rs", k="4", m=2), "k='4' must be an integer >= 2"),
    (dict(scheme="rs", k=4, m=0), "m=0 must be an integer >= 1"),
    (dict(scheme="rs", k=4, m=True), "m=True"),
    (dict(scheme="xor", k=4, m=2), "scheme 'xor' has exactly 1 parity block"),
    (dict(scheme="rs", k=250, m=7), "k \\+ m <= 256"),
    (dict(scheme="rs", k=4, m=2, backend="jerasure"), "backend='jerasure' is not one of"),
    (dict(scheme="xor", k=4, backend="isal"), "backend='isal' is not one of: numpy-xor"),
    (dict(scheme="rs", k=4, m=2, stripe=0), "stripe=0"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        ec.make_codec(**kwargs)
    assert isinstance(err.value, ValueError)


def test_pad_to():
    padded = ec.pad_to(b"\x01\x02\x03", 6)
    assert padded.dtype == np.uint8 and padded.tolist() == [1, 2, 3, 0, 0, 0]
    same = np.arange(6, dtype=np.uint8)
    assert np.shares_memory(ec.pad_to(same, 6), same)
    assert ec.pad_to(np.zeros(2, np.float32), 12).size == 12
    with pytest.raises(ValueError, match="more than the target"):
        ec.pad_to(b"abcd", 3)


def test_fallback_when_a_library_is_missing(monkeypatch):
    pytest.importorskip("zfec")

    def no_isal():
        raise ImportError("libisal not found")
    monkeypatch.setattr(ec, "_load_isal", no_isal)
    assert ec.available_backends("rs") == ["zfec"]
    assert ec.make_codec("rs", 4, 2).backend == "zfec"
    with pytest.raises(ConfigError, match="no usable backend.*isal: ImportError: libisal not found"):
        ec.make_codec("rs", 4, 2, backend="isal")
