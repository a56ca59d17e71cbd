"""Helpers shared by the benchmarks in scripts/bench/: size arguments, finding mpiexec,
and the raw file operations that measure this machine's own limits (what veloc's
figures are divided by). Imported by the scripts, which run from this folder.
"""
import argparse
import os
import shutil
import sys

MIB = 1 << 20
GIB = 1 << 30
MAX_IO = 1 << 30


def parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MIB, "G": GIB}.get(text[-1:], 1)
    value = int(float(text.rstrip("KMG")) * mult)
    if value < 4096 or value % 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: need a multiple of 8 bytes, at least 4 KiB")
    return value


def human(nbytes):
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def find_mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def write_all(fd, view, positioned):
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):
        chunk = view[done:done + MAX_IO]
        done += os.pwrite(fd, chunk, done) if positioned else os.write(fd, chunk)


def write_file(path, view, fsync=False, fresh=True):
    """Write ``view`` to a new file (``fresh``) or over an existing one of the same size."""
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if fresh else 0), 0o600)
    try:
        write_all(fd, view, not fresh)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file_direct(path, aligned):
    """Write the page-aligned buffer ``aligned`` (e.g. an anonymous ``mmap``; its length a
    multiple of 4096) to a new file with ``O_DIRECT``, then fsync: the disk's own limit,
    without the page cache (what the flush does)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        write_all(fd, aligned, True)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file_into(path, view):
    view = memoryview(view).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:done + MAX_IO]], done)
            if n == 0:
                raise OSError(f"{path}: short read at byte {done}")
            done += n
    finally:
        os.close(fd)


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def evict_tree(root):
    """Drop the (fsynced, clean) pages of every file under ``root`` from the page cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def clear_dir(path):
    """Remove everything inside ``path`` (not ``path`` itself)."""
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            unlink(full)


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
