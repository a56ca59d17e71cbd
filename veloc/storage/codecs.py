"""Codec registry: named byte codecs for compressed checkpoint copies.

A codec encodes one block (a buffer of at most ``[compress] block_size`` bytes) into
bytes and decodes stored bytes straight into a caller's buffer of the block's raw size,
so a restore never needs a temporary larger than one block. The codec of every block is
recorded in the compressed file's header (see ``veloc/storage/compressed_file.py``), so
a restart undoes it without looking at the config.

Called by the node's engine (the compress module, in the sync-mode leader rank or the
active backend) to encode, and by each application rank, the engine and the ``veloc``
tool to decode. The libraries come with the ``compress`` extra
(``pip install veloc[compress]``); a codec whose library is missing is still listed,
and using it raises :class:`~veloc.errors.ConfigError` saying what to install.

Lossless codecs (chosen by ``scripts/bench/bench_codecs.py``, figures in the README):

* ``none``: the bytes as they are;
* ``lz4``: LZ4 block format (``lz4`` package), fastest, for byte-level redundancy;
* ``zstd``: Zstandard (``zstandard`` package), better ratios at lower speed;
* ``blosc2``: Blosc2 with byte shuffle and LZ4 (``blosc2`` package, clevel 1): groups
  the bytes of each element by significance first, which shrinks smooth numeric fields
  that byte-level codecs cannot.

Lossy: ``zfp`` (``zfpy`` package) with an absolute error bound, applied only to regions
the user protected with ``lossy=("zfp", bound)``.

A new codec is a :class:`Codec` subclass passed to :func:`register_codec` (see
docs/ARCHITECTURE.md, "How to add a codec").
"""
import importlib
import threading
from typing import Dict, Optional

import numpy as np

from veloc.errors import ConfigError, CorruptCheckpointError

EXTRA_HINT = "install the compression libraries with: pip install 'veloc[compress]'"


class Codec:
    """One codec. Subclasses set ``name``, ``library`` (the module to import, ``None``
    for none) and implement :meth:`encode` and :meth:`decode_into`."""
    name = "codec"
    library: Optional[str] = None
    lossy = False

    def module(self):
        """The imported library; ConfigError naming the package when it is missing."""
        if self.library is None:
            return None
        try:
            return importlib.import_module(self.library)
        except ImportError:
            raise ConfigError(f"codec {self.name!r} needs the {self.library.split('.')[0]!r} package; "
                              f"{EXTRA_HINT}") from None

    def available(self) -> bool:
        try:
            self.module()
        except ConfigError:
            return False
        return True

    def encode(self, data: memoryview, itemsize: int = 1, level: Optional[int] = None) -> bytes:
        """Compressed bytes of ``data`` (``itemsize``: element size, for codecs that use it)."""
        raise TypeError(f"codec {self.name!r} does not encode")

    def decode_into(self, data: memoryview, out: memoryview) -> None:
        """Decode ``data`` into ``out``, which has exactly the raw size; raise
        CorruptCheckpointError when the stored bytes do not decode to that size."""
        raise TypeError(f"codec {self.name!r} does not decode")


def _bad(codec, exc):
    return CorruptCheckpointError(f"{codec} block does not decode ({type(exc).__name__}: {exc})")


class NoneCodec(Codec):
    name = "none"

    def encode(self, data, itemsize=1, level=None):
        return bytes(data)

    def decode_into(self, data, out):
        if len(data) != len(out):
            raise CorruptCheckpointError(f"raw block holds {len(data)} bytes, {len(out)} expected")
        out[:] = data


class Lz4Codec(Codec):
    name = "lz4"
    library = "lz4.block"

    def encode(self, data, itemsize=1, level=None):
        # level > 0: LZ4's acceleration (higher = faster, larger output)
        return self.module().compress(data, store_size=False, acceleration=max(1, level or 1))

    def decode_into(self, data, out):
        try:
            raw = self.module().decompress(data, uncompressed_size=len(out))
        except Exception as exc:
            raise _bad(self.name, exc) from None
        if len(raw) != len(out):
            raise _bad(self.name, ValueError(f"{len(raw)} bytes decoded, {len(out)} expected"))
        out[:] = raw


class ZstdCodec(Codec):
    name = "zstd"
    library = "zstandard"
    _local = threading.local()     # zstandard's contexts are not thread-safe: one per thread

    def encode(self, data, itemsize=1, level=None):
        level = 1 if level is None else level
        local = self._local
        if getattr(local, "level", None) != level:
            local.compressor = self.module().ZstdCompressor(level=level)
            local.level = level
        return local.compressor.compress(data)

    def decode_into(self, data, out):
        local = self._local
        if getattr(local, "decompressor", None) is None:
            local.decompressor = self.module().ZstdDecompressor()
        try:
            raw = local.decompressor.decompress(data, max_output_size=len(out))
        except Exception as exc:
            raise _bad(self.name, exc) from None
        if len(raw) != len(out):
            raise _bad(self.name, ValueError(f"{len(raw)} bytes decoded, {len(out)} expected"))
        out[:] = raw


class Blosc2Codec(Codec):
    name = "blosc2"
    library = "blosc2"

    def encode(self, data, itemsize=1, level=None):
        blosc2 = self.module()
        size = itemsize if itemsize in (1, 2, 4, 8, 16) and len(data) % itemsize == 0 else 1
        return blosc2.compress2(data, typesize=size, clevel=1 if level is None else level,
                                codec=blosc2.Codec.LZ4, filters=[blosc2.Filter.SHUFFLE], nthreads=1)

    def decode_into(self, data, out):
        blosc2 = self.module()
        try:
            n = blosc2.decompress2(data, dst=out, nthreads=1)
        except Exception as exc:
            raise _bad(self.name, exc) from None
        if n is not None and n != len(out):
            raise _bad(self.name, ValueError(f"{n} bytes decoded, {len(out)} expected"))


class ZfpCodec(Codec):
    """Lossy: encodes a float32/float64 array block within an absolute error bound."""
    name = "zfp"
    library = "zfpy"
    lossy = True
    DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

    def encode_array(self, block: np.ndarray, tolerance: float) -> bytes:
        return self.module().compress_numpy(np.ascontiguousarray(block), tolerance=float(tolerance))

    def decode_into_array(self, data, out: np.ndarray) -> None:
        try:
            decoded = self.module().decompress_numpy(bytes(data))
        except Exception as exc:
            raise _bad(self.name, exc) from None
        if decoded.shape != out.shape or decoded.dtype != out.dtype:
            raise _bad(self.name, ValueError(f"decoded {decoded.dtype} {decoded.shape}, "
                                             f"{out.dtype} {out.shape} expected"))
        np.copyto(out, decoded)


_CODECS: Dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Make ``codec`` available by its name (replacing one of the same name); any process."""
    if not isinstance(codec, Codec) or not codec.name.isidentifier():
        raise TypeError("register_codec takes a Codec instance whose name is an identifier")
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The registered codec ``name`` with its library importable; ConfigError otherwise."""
    codec = _CODECS.get(name)
    if codec is None:
        raise ConfigError(f"unknown codec {name!r}; registered codecs: {', '.join(sorted(_CODECS))}")
    codec.module()
    return codec


def codec_names(lossy: bool = False) -> list:
    """Names of the registered codecs (lossless ones, or the lossy ones)."""
    return sorted(n for n, c in _CODECS.items() if c.lossy == lossy)


for _codec in (NoneCodec(), Lz4Codec(), ZstdCodec(), Blosc2Codec(), ZfpCodec()):
    register_codec(_codec)
