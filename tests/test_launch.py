"""The replay runner that calls Triton's C launch entry directly (``kernels/launch.py``): argument order for the
launcher layout it was written against, and Triton's own runner for any other layout or an active launch hook."""

import pytest
import torch

launch = pytest.importorskip("svdq.kernels.launch")


class Launcher36:
    """Triton 3.6's CudaLauncher shape: ``__call__(gridX, gridY, gridZ, stream, function, *args)``."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = True

    def __init__(self):
        self.calls = []

    def launch(self, *a):
        self.calls.append(a)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        raise AssertionError("the direct runner must not go through __call__")


class LauncherOther(Launcher36):
    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, launch_enter_hook,
                 launch_exit_hook, *args):
        raise AssertionError("not called in this test")


class Compiled:
    function = 1234
    packed_metadata = ("meta",)

    def __init__(self, run):
        self.run = run
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *a: ("triton runner", grid, a)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "enabled", lambda: True)
    monkeypatch.setattr(launch, "_launch_hook_active", lambda: False)
    monkeypatch.setattr(launch, "_raw_stream", lambda: (lambda dev: 7000 + dev))


def test_direct_runner_passes_the_c_entry_its_arguments_in_order(fast):
    run = Launcher36()
    runner = launch._direct_runner(Compiled(run), (3, 2, 1), 0)
    runner("x", 5, 1.5)
    assert run.calls == [(3, 2, 1, 7000, 1234, False, True, None, None, ("meta",), None, None, None, "x", 5, 1.5)]


def test_other_launcher_layouts_keep_tritons_runner(fast):
    runner = launch._direct_runner(Compiled(LauncherOther()), (3, 2, 1), 0)
    assert runner("x") == ("triton runner", (3, 2, 1), ("x",))


@pytest.mark.parametrize("why", ["scratch", "hook", "disabled", "no device"])
def test_direct_runner_declines_what_it_cannot_replay(why, fast, monkeypatch):
    run = Launcher36()
    dev = 0
    if why == "scratch":
        run.global_scratch_size = 64
    elif why == "hook":
        monkeypatch.setattr(launch, "_launch_hook_active", lambda: True)
    elif why == "disabled":
        monkeypatch.setattr(launch, "enabled", lambda: False)
    else:
        dev = None
    runner = launch._direct_runner(Compiled(run), (1, 1, 1), dev)
    assert runner(torch.zeros(1))[0] == "triton runner"
    assert run.calls == []
