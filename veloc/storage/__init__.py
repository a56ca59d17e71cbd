"""Storage layer: how checkpoint data sits on a level and how it is committed.

Atomic commit (``fileio``), the per-level trees (``levels``), commit records
(``manifest``), the rank file formats (``rankfile`` native, ``compressed_file`` and its
``codecs``, ``hdf5_format``/``hdf5_global``), the persistent format interface
(``formats``), the client's local write (``local_write``, ``write_mappings``), digests
(``hashing``) and crash-debris collection (``debris``). Nothing here talks to another
process: the engine's modules and the client call it.
"""
