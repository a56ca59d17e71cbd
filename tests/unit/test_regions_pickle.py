"""Objects protected with ``pickle=True``: dict, list, set, bytearray, arrays and objects
with ``__dict__`` come back in place (the same Python object); anything else goes to
``Client.recovered[id]``; a type change is a RestartError before anything is touched."""
import numpy as np
import pytest

import veloc
from veloc.errors import RestartError
from veloc.regions import check_in_place, restore_in_place


class State:
    def __init__(self, step=0, lr=0.1):
        self.step, self.lr = step, lr


class Slotted:
    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x

    def __getstate__(self):
        return self.x

    def __setstate__(self, x):
        self.x = x


def cases():
    """(id, object at checkpoint time, mutation after it, expected value after restart)."""
    return [
        ("dict", {"lr": 0.1, "step": 3}, lambda d: d.update(step=99, extra=1), {"lr": 0.1, "step": 3}),
        ("list", [1, [2, 3], "x"], lambda v: v.append(4), [1, [2, 3], "x"]),
        ("set", {1, 2, 3}, lambda v: (v.discard(1), v.add(7)), {1, 2, 3}),
        ("bytes", bytearray(b"abc"), lambda v: v.extend(b"def"), bytearray(b"abc")),
        ("obj", State(5, 0.01), lambda v: setattr(v, "step", 77), None),
        ("objarr", np.array([{"a": 1}, None], dtype=object), lambda v: v.__setitem__(1, 5), None),
    ]


@pytest.fixture
def cfg(dirs, monkeypatch):
    monkeypatch.setenv("VELOC_NODE_ID", "n0")
    return {"scratch": str(dirs["scratch"] / "{node}")}


def test_each_kind_is_restored_in_place(cfg):
    client = veloc.init_single(0, cfg)
    objs = {cid: obj for cid, obj, _, _ in cases()}
    for cid, obj in objs.items():
        client.protect(cid, obj, pickle=True)
    client.checkpoint("p", 1)
    for cid, obj, mutate, _ in cases():
        mutate(objs[cid])
    assert objs["dict"]["step"] == 99 and 4 in objs["list"]
    client.restart("p", client.restart_test("p"))
    for cid, _, _, expected in cases():
        assert client.recovered[cid] is objs[cid], cid       # the same object, refilled
        if expected is not None:
            assert objs[cid] == expected, cid
    assert vars(objs["obj"]) == {"step": 5, "lr": 0.01}
    assert objs["objarr"][1] is None and objs["objarr"][0] == {"a": 1}
    client.finalize()


def test_new_process_gets_its_initial_objects_refilled(cfg):
    writer = veloc.init_single(0, cfg)
    writer.protect("opt", {"lr": 0.5, "step": 10}, pickle=True)
    writer.checkpoint("p", 3)
    writer.finalize()
    opt = {"lr": 0.1, "step": 0}                  # what a restarted job starts with
    reader = veloc.init_single(0, cfg)
    reader.protect("opt", opt, pickle=True)
    reader.restart("p", reader.restart_test("p"))
    assert opt == {"lr": 0.5, "step": 10}
    reader.finalize()


@pytest.mark.parametrize("value", [7, 2.5, "text", (1, 2), None, frozenset({1}), Slotted(4)],
                         ids=["int", "float", "str", "tuple", "None", "frozenset", "slots"])
def test_immutable_objects_go_to_recovered(cfg, value):
    client = veloc.init_single(0, cfg)
    client.protect("v", value, pickle=True)
    client.checkpoint("p", 1)
    placeholder = type(value).__new__(type(value)) if isinstance(value, Slotted) else value
    client.protect("v", placeholder, pickle=True)
    client.restart("p", 1)
    got = client.recovered["v"]
    assert (got.x == 4) if isinstance(value, Slotted) else got == value
    client.finalize()


def test_type_change_is_a_restart_error_before_anything_is_touched(cfg):
    client = veloc.init_single(0, cfg)
    arr = np.arange(4.0)
    client.protect("arr", arr)
    client.protect("state", [1, 2], pickle=True)
    client.checkpoint("p", 1)
    arr[:] = -1
    state = {"now": "a dict"}
    client.protect("state", state, pickle=True)
    with pytest.raises(RestartError, match=r"region 'state' .* cannot be restored in place: the checkpoint "
                                           r"holds a list, the protected object is a dict"):
        client.restart("p", 1)
    assert (arr == -1).all() and state == {"now": "a dict"}     # nothing was touched
    client.finalize()


def test_helpers_on_their_own():
    d = {"a": 1}
    assert restore_in_place(d, {"b": 2}) and d == {"b": 2}
    assert restore_in_place(5, 6) is False and check_in_place((1,), (2,)) is False
    with pytest.raises(TypeError, match="holds a State, the protected object is a dict"):
        check_in_place({}, State())
    with pytest.raises(TypeError, match="array"):
        check_in_place(np.zeros(3), np.zeros(4))


def test_veloc_binding_ckpt(cfg):
    c = veloc.Ckpt(0, cfg)
    state = {"it": 4, "h": [1.0, 2.0]}
    c.protected = state
    c.checkpoint("b", 4)
    state["it"] = 100
    assert c.restart_test("b", 0) == 4 and c.restart_test("nothing", 0) < 0
    c.restart("b", 4)
    assert c.protected is state and state == {"it": 4, "h": [1.0, 2.0]}
    c.protected = 41                     # VELOC's own use: the attribute is replaced
    c.checkpoint("b", 5)
    c.protected = {"other": "type"}
    c.restart("b", 5)
    assert c.protected == 41
    c.finalize()
