"""``veloc ls``/``verify`` and the HDF5 persistent format: a version whose ``global.h5``
is missing (an unfinished flush) is not complete at the persistent level."""
import numpy as np
import pytest

from veloc.cli import main

pytest.importorskip("h5py")
pytestmark = pytest.mark.timeout(60)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_and_verify_see_an_hdf5_version_without_global_h5_as_incomplete(dirs, capsys):
    import veloc
    ini = dirs["tmp"] / "h.ini"
    ini.write_text(f"scratch = {dirs['scratch']}/{{node}}\npersistent = {dirs['persistent']}\n[flush]\nformat = hdf5\n")
    with veloc.init_single(0, str(ini)) as client:
        client.protect("g", np.arange(4.0))
        client.checkpoint("h", 1)
    code, out, _ = run(capsys, "ls", ini, "--all-nodes")
    assert code == 0 and "  h v1: scratch persistent" in out
    (dirs["persistent"] / "h" / "v1" / "global.h5").unlink()
    code, out, _ = run(capsys, "ls", ini, "--all-nodes")
    assert code == 0 and "  h v1: scratch\n" in out and "no global.h5: the version is not complete" in out
    code, out, _ = run(capsys, "verify", ini, "h", "--all-nodes")
    assert code == 0 and "MISSING persistent h v1 rank 0" in out and "h: 1 OK, 0 FAIL, 1 missing" in out
