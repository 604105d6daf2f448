"""``kernels/settings.py``: the per-call environment reads agree with ``os.environ.get`` in every case."""

import os

from svdq.kernels.settings import getenv, snapshot


def test_getenv_follows_os_environ(monkeypatch):
    monkeypatch.setenv("SVDQ_TEST_SWITCH", "tma")
    assert getenv("SVDQ_TEST_SWITCH") == "tma" == os.environ.get("SVDQ_TEST_SWITCH")
    monkeypatch.setenv("SVDQ_TEST_SWITCH", "")
    assert getenv("SVDQ_TEST_SWITCH", "auto") == ""  # set but empty is not unset
    monkeypatch.delenv("SVDQ_TEST_SWITCH")
    assert getenv("SVDQ_TEST_SWITCH") is None and getenv("SVDQ_TEST_SWITCH", "auto") == "auto"
    os.environ["SVDQ_TEST_SWITCH"] = "ünïcode"  # written the plain way, read back decoded
    try:
        assert getenv("SVDQ_TEST_SWITCH") == "ünïcode"
    finally:
        del os.environ["SVDQ_TEST_SWITCH"]
    assert getenv("SVDQ_TEST_SWITCH") is None


def test_snapshot_changes_exactly_when_a_value_does(monkeypatch):
    names = ("SVDQ_TEST_A", "SVDQ_TEST_B")
    monkeypatch.delenv("SVDQ_TEST_A", raising=False)
    monkeypatch.delenv("SVDQ_TEST_B", raising=False)
    before = snapshot(names)
    assert before == snapshot(names) and hash(before) == hash(snapshot(names))
    monkeypatch.setenv("SVDQ_TEST_B", "0")
    changed = snapshot(names)
    assert changed != before
    monkeypatch.setenv("SVDQ_TEST_B", "1")
    assert snapshot(names) not in (before, changed)
    monkeypatch.delenv("SVDQ_TEST_B")
    assert snapshot(names) == before


def test_a_replaced_environ_is_read_as_it_is(monkeypatch):
    """Code that swaps ``os.environ`` for a plain mapping (some test tools do) is read through that mapping."""
    monkeypatch.setattr(os, "environ", {"SVDQ_TEST_SWITCH": "epilogue"})
    assert getenv("SVDQ_TEST_SWITCH") == "epilogue" and getenv("SVDQ_TEST_OTHER", "x") == "x"
    assert snapshot(("SVDQ_TEST_SWITCH", "SVDQ_TEST_OTHER")) == ("epilogue", None)
