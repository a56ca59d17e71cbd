"""Writable mappings of a rank's recycled scratch files, kept from one checkpoint to the next.

Used by one application rank (``veloc.storage.local_write``) in sync and async mode. A
recycled scratch file comes back from the pool under a new name but is the same inode;
mapping it anew for every checkpoint costs a page-table population (``MAP_POPULATE``)
and an unmap, about a quarter of the whole local write of a large rank file. Keeping the
mapping makes the local write one ``memcpy`` into pages that are already mapped.

At most ``keep`` mappings are held: the files in rotation (``scratch_versions`` plus the
pool's). A file deleted while mapped (garbage collection found the pool full) keeps its
memory until its mapping is evicted or the client finalizes. Nothing else truncates a
scratch file in place, so a kept mapping never points past the end of its file.
"""
import mmap
import os
from collections import OrderedDict


class WriteMappings:
    def __init__(self, keep):
        self.keep = max(1, int(keep))
        self._maps = OrderedDict()    # (st_dev, st_ino) -> mmap of the whole file

    def get(self, fd, size):
        """A shared writable mapping of the open file ``fd``, exactly ``size`` bytes long.

        Reuses the mapping kept for this inode when it has that size; otherwise sets the
        file to ``size`` bytes and maps it, pre-faulted. ``size`` must be > 0.
        """
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        mapped = self._maps.pop(key, None)
        if mapped is not None and (len(mapped) != size or st.st_size != size):
            mapped.close()        # before any truncation, never after
            mapped = None
        if mapped is None:
            if st.st_size != size:
                os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self._maps[key] = mapped
        while len(self._maps) > self.keep:
            self._maps.popitem(last=False)[1].close()
        return mapped

    def adopt(self, fd, mapped):
        """Keep ``mapped``, a shared writable mapping of the whole open file ``fd`` made by
        the caller (a file prepared for a later write), as that inode's mapping."""
        st = os.fstat(fd)
        old = self._maps.pop((st.st_dev, st.st_ino), None)
        if old is not None and old is not mapped:
            old.close()
        self._maps[(st.st_dev, st.st_ino)] = mapped
        while len(self._maps) > self.keep:
            self._maps.popitem(last=False)[1].close()

    def forget(self, fd):
        """Drop the mapping of ``fd``'s inode, if any (before the file is rewritten or resized)."""
        st = os.fstat(fd)
        mapped = self._maps.pop((st.st_dev, st.st_ino), None)
        if mapped is not None:
            mapped.close()

    def __len__(self):
        return len(self._maps)

    def close(self):
        while self._maps:
            self._maps.popitem()[1].close()
