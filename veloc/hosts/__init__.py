"""Where a client's engine runs: the host interface (``base``), inside the application in
sync mode (``sync_host``), in the node's backend process in async mode (``async_host``).
Built by :class:`veloc.client.Client` on every application rank."""
