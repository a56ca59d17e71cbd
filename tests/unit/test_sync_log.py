"""Sync mode logs like async: with ``log_prefix`` the node leader's engine writes each
module's time per version to ``<log_prefix>/veloc-sync-<node>.log`` (0600); the lines do
not reach the application's own log handlers, its warnings still do."""
import logging
import stat

import numpy as np

import veloc
from veloc.logfile import sync_engine_logger


def test_sync_engine_writes_module_timings(dirs, monkeypatch, caplog):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    logs = dirs["tmp"] / "logs" / "{node}"
    cfg = {"scratch": str(dirs["scratch"] / "{node}"), "persistent": str(dirs["persistent"]),
           "log_prefix": str(logs), "mode": "sync"}
    caplog.set_level(logging.INFO)
    with veloc.init_single(0, cfg) as client:
        client.protect("a", np.arange(1000.0))
        client.checkpoint("lg", 1)
        client.checkpoint("lg", 2)
    path = dirs["tmp"] / "logs" / "n0" / "veloc-sync-n0.log"
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "sync engine of node n0" in text
    for module in ("checksum", "flush"):
        for version in (1, 2):
            assert f"lg v{version}: {module} done in" in text, text
    assert "[n0 pid" in text
    assert not [r for r in caplog.records if "done in" in r.getMessage()]   # not in the app's handlers
    logger = sync_engine_logger(veloc.load_config(cfg, environ={}), "n0", None)
    logger.warning("disk nearly full")
    assert any(r.getMessage() == "disk nearly full" for r in caplog.records)


def test_no_log_prefix_no_file(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    fallback = logging.getLogger("veloc.client")
    assert sync_engine_logger(veloc.load_config({"scratch": "/s"}, environ={}), "n0", fallback) is fallback
    with veloc.init_single(0, {"scratch": str(dirs["scratch"] / "{node}")}) as client:
        client.protect("a", np.zeros(3))
        client.checkpoint("lg", 1)
    assert not list(dirs["tmp"].rglob("veloc-sync-*.log"))
