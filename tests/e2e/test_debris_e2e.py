"""End-to-end: the debris of ranks SIGKILLed in the middle of a checkpoint is collected
by the next job's ranks at ``init``, and the committed version they restart from is intact.

4 virtual nodes (one rank each), sync mode, partner level and persistent. The first job
commits version 1 everywhere; in version 2, rank 2 dies with its rank file written but
no manifest committed, and rank 3 dies in the middle of writing its rank file (its
temporary file stays). The second job restarts from version 1, logs what each rank
collected, and checkpoints version 2 again.
"""
import re

import pytest

from conftest import persistent_ranks, run_mpi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
NODES = ["n0", "n1", "n2", "n3"]

APP = '''
import logging, os, signal, sys
import numpy as np
from mpi4py import MPI
import veloc, veloc.client, veloc.storage.local_write

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
cfg, phase = sys.argv[1], sys.argv[2]
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
a = np.full(1 << 18, float(rank + 1))            # 2 MiB per rank
ck = veloc.init(cfg, comm)
ck.writer.prepare_enabled = False                # v2's torn file is a fresh one of 64 KiB
ck.protect("a", a)
if phase == "crash":
    ck.checkpoint("job", 1)
    comm.Barrier()
    a += 10
    if rank == 3:
        def dying(fd, *args, **kwargs):          # killed in the middle of the local write
            os.pwrite(fd, b"x" * 65536, 0)
            comm.Barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        veloc.storage.local_write.write_rank_file = dying
    if rank >= 2:
        ck.checkpoint_begin("job", 2)
        ck.checkpoint_mem()                      # rank 2: file in place, never committed
    comm.Barrier()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    import time
    time.sleep(60)                               # mpiexec ends the job
v = ck.restart_test("job")
a[:] = 0
ck.restart("job", v)
ok = comm.allreduce(bool((a == rank + 1).all()), op=MPI.LAND)
ck.checkpoint("job", 2)
ck.finalize()
if rank == 0:
    print(f"debris-e2e: restarted v{v} exact {ok}", flush=True)
'''


def test_killed_ranks_debris_is_collected_at_the_next_init(dirs):
    cfg = dirs["tmp"] / "debris.ini"
    cfg.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n"
                   "mode = sync\nscratch_versions = 1\n[partner]\nenabled = true\n")
    app = dirs["tmp"] / "debris_app.py"
    app.write_text(APP)
    crashed = run_mpi([app, cfg, "crash"], nodes=NODES, check=False, timeout=90)
    assert crashed.returncode != 0
    v2 = {n: dirs["scratch"] / n / "job" / "v2" for n in NODES}
    temps = list(v2["n3"].glob(".r3.vck.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size == 65536, list(v2["n3"].iterdir())
    assert (v2["n2"] / "r2.vck").exists() and not (v2["n2"] / "r2.manifest.json").exists()

    proc = run_mpi([app, cfg, "restart"], nodes=NODES, timeout=90)
    assert "debris-e2e: restarted v1 exact True" in proc.stdout, proc.stdout + proc.stderr
    collected = dict(re.findall(r"debris: rank (\d) at init collected (\d+) file\(s\)", proc.stderr))
    assert collected.get("2") == "1" and collected.get("3") == "1", proc.stderr
    assert "65536 byte(s)" in proc.stderr, proc.stderr
    leftovers = [p for p in dirs["scratch"].rglob("*.tmp")] + [p for p in dirs["persistent"].rglob("*.tmp")]
    assert not leftovers, leftovers
    for i, node in enumerate(NODES):     # version 2 written again and committed on every node
        assert (v2[node] / f"r{i}.manifest.json").exists()
    assert persistent_ranks(dirs["persistent"] / "job" / "v2") == list(range(len(NODES)))
    assert len(list((dirs["persistent"] / "job" / "v2").glob("n*.commit.json"))) == len(set(NODES))
