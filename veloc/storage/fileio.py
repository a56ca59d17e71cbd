"""Low-level file operations on the data path, shared by the client and the engine.

Everything here works on buffers (memoryviews) and file descriptors: no Python loop
touches the data. Used by application ranks (local write, restart read) and by the engine
in the sync-mode leader or the active backend (copies between levels).
"""
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import secrets
from pathlib import Path

from veloc.errors import CheckpointError

FILE_MODE = 0o600
DIR_MODE = 0o700
COPY_CHUNK = 16 << 20
DIRECT_CHUNK = 32 << 20
DIRECT_ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
DIRECT_MIN_SIZE = 1 << 20
MAX_IO = 1 << 30  # Linux moves at most ~2 GiB per read/write call
O_DIRECT = getattr(os, "O_DIRECT", 0)


def make_dirs(path):
    """Create ``path`` and any missing parents with mode 0700; raise CheckpointError naming it."""
    try:
        if not os.path.isdir(path):
            parent = os.path.dirname(os.path.abspath(path))
            if parent != path and not os.path.isdir(parent):
                make_dirs(parent)
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create directory {path}: {exc.strerror}") from exc


def fsync_dir(path):
    """Make a rename or unlink inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path):
    """A unique hidden temporary name next to ``path`` (same directory, so rename is atomic):
    ``.<name>.<writer tag>.<random>.tmp``. The writer tag (:func:`writer_tag`) names the
    process that writes it, so crash-debris collection (``veloc.storage.debris``) can tell
    a temporary file of a live writer from one a killed writer left behind."""
    return path.with_name(f".{path.name}.{writer_tag()}.{secrets.token_hex(4)}.tmp")


_TAG = (None, None)    # (pid, tag) of this process; recomputed after a fork


def writer_tag():
    """``<boot>-<pid>-<start>``: this machine's boot (8 hex digits of the kernel's boot id),
    this process's pid and its start time (clock ticks since boot), which together name
    one process across pid reuse, reboots and machines."""
    global _TAG
    pid = os.getpid()
    if _TAG[0] != pid:
        _TAG = (pid, f"{boot_tag()}-{pid}-{process_start(pid) or 0}")
    return _TAG[1]


@functools.lru_cache(maxsize=1)
def boot_tag():
    """8 hex digits identifying this machine's current boot (the host name's hash where
    the kernel has no boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        import hashlib
        import socket
        return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def process_start(pid):
    """Start time of live process ``pid`` in clock ticks since boot, ``None`` if it does
    not exist or is a zombie, ``0`` where ``/proc`` does not say."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pwrite_all(fd, view, offset):
    """Write the whole memoryview at ``offset``, looping over short writes."""
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + MAX_IO], offset + done)


def preadinto_all(fd, view, offset):
    """Fill the whole writable memoryview from ``offset``; return the number of bytes read."""
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + MAX_IO]], offset + done)
        if n == 0:
            break
        done += n
    return done


def commit_temp(fd, tmp, path, durable=True, sync_dir=True):
    """The commit step every writer of veloc ends with: fsync and close ``fd`` (open on the
    temporary file ``tmp`` next to ``path``), rename ``tmp`` over ``path``, fsync the
    directory. A crash at any point leaves either the old ``path`` or the new one; on an
    error ``tmp`` is removed and the error raised. ``durable=False`` skips both fsyncs
    (node-local tmpfs, runtime files); ``sync_dir=False`` skips the directory's, for a
    file that a later commit record names (that commit syncs the directory once)."""
    try:
        try:
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


def open_temp(path, reuse=None):
    """``(fd, tmp)``: a private temporary file next to ``path``, opened read-write, mode
    0600. ``reuse``: an allocated file of a collected version to write over instead of
    fresh pages (renamed to the temporary name; a fresh file if it is gone)."""
    path = Path(path)
    tmp = temp_name(path)
    if reuse is not None:
        try:
            os.replace(reuse, tmp)
            return os.open(tmp, os.O_RDWR), tmp
        except OSError:
            _unlink_quietly(tmp)
    return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE), tmp


@contextlib.contextmanager
def atomic_file(path, durable=True, reuse=None, staged=False, sync_dir=True):
    """Yield the descriptor of a private temporary file that replaces ``path`` on success
    (:func:`commit_temp`); on an exception the temporary file is removed. ``reuse``: see
    :func:`open_temp` (the writer must then truncate to its own size).

    ``staged=True``: a file that only counts once a later commit record names it (the
    shared levels, ``veloc.storage.node_records``). It is written under ``path`` itself
    when no such file exists yet (no rename; a crash leaves an uncommitted file that no
    record names), else through a temporary file renamed over it; the directory is not
    synced (the record's commit does it once for every file); nor with ``sync_dir=False``."""
    path = Path(path)
    if staged:
        try:
            fd = _create_exclusive(path)
        except FileExistsError:
            fd = None
        if fd is not None:
            try:
                yield fd
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quietly(path)
                raise
            os.close(fd)
            return
    fd, tmp = open_temp(path, reuse)
    try:
        yield fd
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    commit_temp(fd, tmp, path, durable, sync_dir=sync_dir and not staged)


@contextlib.contextmanager
def atomic_path(path, durable=True, staged=False):
    """Yield the path of a private temporary file (created empty, mode 0600) next to
    ``path``, for writers that open files by name (h5py); on success it replaces ``path``
    (:func:`commit_temp`), on an exception it is removed. ``staged``: the directory is
    not synced (see :func:`atomic_file`)."""
    path = Path(path)
    fd, tmp = open_temp(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    commit_temp(fd, tmp, path, durable, sync_dir=not staged)


def _create_exclusive(path):
    """Open a new file ``path`` (mode 0600), creating its folder first if it is missing
    (no lookup before the create: the common case costs one call)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileNotFoundError:
        make_dirs(path.parent)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)


def atomic_write_bytes(path, data, durable=True, reuse=None, sync_dir=True):
    """Commit ``data`` at ``path`` atomically (see :func:`atomic_file`); ``sync_dir=False``:
    the caller syncs the directory itself (one sync for several commits)."""
    with atomic_file(path, durable, reuse, sync_dir=sync_dir) as fd:
        pwrite_all(fd, data, 0)
        if reuse is not None:
            os.ftruncate(fd, len(data))


def copy_file(src, dst, durable=True, on_chunk=None, direct=False, source_map=None, staged=False):
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_file`) and return the size.

    ``direct=True`` (the flush to persistent storage) writes with ``O_DIRECT`` straight
    from a read-only mapping of ``src``: no copy into the page cache, whose fresh pages
    and writeback cost more CPU than the rest of the flush (see :func:`_copy_direct`).
    Otherwise tries ``copy_file_range`` (in-kernel); between tmpfs and disk it fails with
    EXDEV on some kernels, so falls back to large ``readinto``/``write`` chunks.
    ``on_chunk(view)`` (e.g. a hasher's update) sees every byte once, in order.
    ``source_map``: an existing read-only mapping of the whole of ``src`` for the direct
    path (the caller keeps it open). ``staged``: see :func:`atomic_file`.
    """
    with open(src, "rb", buffering=0) as fin, atomic_file(dst, durable, staged=staged) as fd:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        if direct and size >= DIRECT_MIN_SIZE and _set_direct(fd, True):
            done = _copy_direct(fin.fileno(), fd, size, on_chunk, source_map)
        elif on_chunk is None:
            done = _copy_in_kernel(fin.fileno(), fd, size)
        if done < size:
            _copy_chunks(fin, fd, done, size, on_chunk)
    return size


def _set_direct(fd, enable):
    """Switch ``O_DIRECT`` on or off for ``fd``; False where the file system refuses it."""
    if not O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | O_DIRECT) if enable else (flags & ~O_DIRECT))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def _copy_direct(fd_in, fd_out, size, on_chunk, source_map=None):
    """Write the block-aligned bulk of ``fd_in`` to ``fd_out`` (opened ``O_DIRECT``) from a
    read-only mapping of the source, and return how many bytes were written.

    The mapping is page-aligned, so the device reads the source pages in place: the only
    CPU work is ``on_chunk``. The unaligned tail (and anything after a write the device
    refuses) is left to the caller's buffered path, with ``O_DIRECT`` switched off again.
    """
    if source_map is not None and len(source_map) == size:
        done = _write_direct_from(memoryview(source_map), fd_out, size, on_chunk)
    else:
        # pre-fault the mapping only for on_chunk: the direct write pins the pages itself
        populate = getattr(mmap, "MAP_POPULATE", 0) if on_chunk is not None else 0
        with mmap.mmap(fd_in, size, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ) as mapped:
            done = _write_direct_from(memoryview(mapped), fd_out, size, on_chunk)
    _set_direct(fd_out, False)
    return done


def _write_direct_from(view, fd_out, size, on_chunk):
    aligned = size - size % DIRECT_ALIGN
    done = 0
    try:
        while done < aligned:
            chunk = view[done:min(done + DIRECT_CHUNK, aligned)]
            try:
                written = os.pwrite(fd_out, chunk, done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                break  # e.g. a device with larger blocks: finish buffered
            if on_chunk is not None:
                on_chunk(chunk[:written])
            done += written
            if written % DIRECT_ALIGN:
                break
    finally:
        chunk = None
        view.release()
    return done


def _copy_in_kernel(fd_in, fd_out, size):
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fd_in, fd_out, min(size - done, MAX_IO), done, done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    return done


def _copy_chunks(fin, fd_out, start, size, on_chunk):
    buf = bytearray(min(COPY_CHUNK, max(size - start, 1)))
    view = memoryview(buf)
    offset = start
    while offset < size:
        n = os.preadv(fin.fileno(), [view[:min(len(buf), size - offset)]], offset)
        if n == 0:
            raise CheckpointError(f"{fin.name} shrank while being copied (at byte {offset} of {size})")
        if on_chunk is not None:
            on_chunk(view[:n])
        pwrite_all(fd_out, view[:n], offset)
        offset += n


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_quietly(path):
    """Unlink a file if it exists; used by garbage collection and cleanup paths."""
    _unlink_quietly(path)
