"""file_lock (data_contracts.helpers), on the filelock package: threads and processes exclude each
other, the non-blocking form says False at once, each call is its own holder (not reentrant), and
DPO_LOCK_KIND picks flock (native) or a lock file (soft, for shared file systems)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from data_contracts.errors import user_error
from data_contracts.helpers import LockKindError, file_lock

KINDS = ["native", "soft"]


@pytest.fixture(params=KINDS)
def kind(request, monkeypatch):
    monkeypatch.setenv("DPO_LOCK_KIND", request.param)
    return request.param


def _held_elsewhere(path, started: threading.Event, release: threading.Event):
    with file_lock(path) as mine:
        assert mine
        started.set()
        release.wait(10)


def test_two_threads_exclude_each_other(tmp_path, kind):
    path = tmp_path / "sub" / "x.lock"  # parents are created
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_held_elsewhere, args=(path, started, release))
    holder.start()
    assert started.wait(10)
    with file_lock(path, block=False) as mine:  # this thread: another one holds it
        assert mine is False
    entered = threading.Event()

    def waiter():
        with file_lock(path) as mine:
            assert mine
            entered.set()

    w = threading.Thread(target=waiter)
    w.start()
    assert not entered.wait(0.3), "a second thread entered while the first held the lock"
    release.set()
    holder.join(10)
    assert entered.wait(10)
    w.join(10)
    with file_lock(path, block=False) as mine:
        assert mine is True


def test_many_threads_never_overlap(tmp_path, kind):
    path, inside, overlaps = tmp_path / "x.lock", [0], []

    def work():
        for _ in range(15):
            with file_lock(path):
                inside[0] += 1
                if inside[0] != 1:
                    overlaps.append(inside[0])
                threading.Event().wait(0.001)  # give the others a chance to get in (they must not)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not overlaps


def _child_tries(path, kind, out):
    os.environ["DPO_LOCK_KIND"] = kind
    with file_lock(path, block=False) as mine:
        out.put(mine)


def _child_holds(path, kind, started, release):
    os.environ["DPO_LOCK_KIND"] = kind
    with file_lock(path):
        started.set()
        release.wait(10)


def test_two_processes_exclude_each_other(tmp_path, kind):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "x.lock"
    out = ctx.Queue()
    with file_lock(path):  # held here: a child cannot take it
        p = ctx.Process(target=_child_tries, args=(path, kind, out))
        p.start()
        assert out.get(timeout=20) is False
        p.join(20)
    p = ctx.Process(target=_child_tries, args=(path, kind, out))  # released: now it can
    p.start()
    assert out.get(timeout=20) is True
    p.join(20)

    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_child_holds, args=(path, kind, started, release))
    p.start()
    assert started.wait(20)
    with file_lock(path, block=False) as mine:  # a child holds it: this process cannot take it
        assert mine is False
    entered = threading.Event()

    def waiter():
        with file_lock(path):
            entered.set()

    w = threading.Thread(target=waiter)
    w.start()
    assert not entered.wait(0.3)
    release.set()
    p.join(20)
    assert entered.wait(10)
    w.join(10)


def test_not_reentrant(tmp_path, kind):
    """Each call is its own holder, as with the hand-written flock before: asking again from the
    thread that holds it gets False (non-blocking) or an error, never a second hold."""
    path = tmp_path / "x.lock"
    with file_lock(path) as outer:
        assert outer is True
        with file_lock(path, block=False) as inner:
            assert inner is False
        with pytest.raises(RuntimeError, match="[Dd]eadlock"):
            with file_lock(path):
                pass
    with file_lock(path, block=False) as again:
        assert again is True


def test_body_error_releases_the_lock(tmp_path, kind):
    path = tmp_path / "x.lock"
    with pytest.raises(KeyError):
        with file_lock(path):
            raise KeyError("boom")
    with file_lock(path, block=False) as mine:
        assert mine is True


def test_the_lock_file_native_keeps_it_soft_removes_it(tmp_path, kind):
    path = tmp_path / "x.lock"
    with file_lock(path):
        assert path.exists()
    assert path.exists() == (kind == "native")


def _dies_holding(path):
    os.environ["DPO_LOCK_KIND"] = "soft"
    cm = file_lock(path)
    cm.__enter__()
    os._exit(0)  # killed while holding: the lock file stays behind


def test_soft_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LOCK_KIND", "soft")
    path = tmp_path / "x.lock"
    p = multiprocessing.get_context("fork").Process(target=_dies_holding, args=(path,))
    p.start()
    p.join(20)
    assert path.exists() and str(p.pid) in path.read_text()  # the dead holder's marker
    with file_lock(path, block=False) as mine:
        assert mine is True


def test_an_unknown_lock_kind_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LOCK_KIND", "nfs")
    with pytest.raises(LockKindError, match="DPO_LOCK_KIND='nfs'") as e:
        with file_lock(tmp_path / "x.lock"):
            pass
    assert user_error(e.value) is e.value
    assert "\n" not in str(e.value)
