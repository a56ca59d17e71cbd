"""The active backend of veloc (installed as ``veloc_backend``; console scripts
``veloc-backend`` and ``veloc-run``).

One backend process per node and job runs the engine's module pipeline in the
background for the node's application ranks in async mode. Modules:

- :mod:`.main` — the daemon: arguments, logging, request handling, main loop.
- :mod:`.server` — the Unix-socket server (peer-credential check, framing errors).
- :mod:`.workqueue` — journaled queue, per-version aggregation, bounded worker pool.
- :mod:`.journal` — the crash-safe journal of accepted work on scratch.
- :mod:`.lifecycle` — locks, stale-file cleanup, ``ensure_backend`` for clients.
- :mod:`.executor` — the default executor: runs batches through the engine.
- :mod:`.control` — ``drain``/``status``/``shutdown`` for ``veloc`` and ``veloc-run``.
- :mod:`.world` — the backends of a job as one MPI world: engine work ordered across
  nodes, versions missing on a node, lost members, stopping together.
- :mod:`.launcher` — ``veloc-run`` (starts the backend world, then the application).

The application side of async mode is :mod:`veloc.hosts.async_host`; the wire protocol and
endpoint placement are in :mod:`veloc.ipc`.
"""
