"""When kernels get programmatic dependent launch: CUDA devices of capability >= 9 only,
never interpreted, and $PPRUNTIME_PDL=0 turns it off. (That the kernels compile with it for
sm_90 is checked by kernel_compile_check.py and the attention compile script; that graphs
give the same bits with it on and off, by test_gpu_graphs.py on a GPU.)"""

from __future__ import annotations

import pytest
import torch

from ppruntime.config import DEPENDENT_LAUNCH_ENV
from ppruntime.kernels import dependent_launch


@pytest.fixture
def capability(monkeypatch):
    """Pretend to be a CUDA machine whose GPU has the capability set in the returned dict."""
    state = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (state["major"], 0))
    monkeypatch.setattr(dependent_launch, "HAVE_GDC", True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(DEPENDENT_LAUNCH_ENV, raising=False)
    dependent_launch._supported.cache_clear()
    yield state
    dependent_launch._supported.cache_clear()


def test_hopper_gets_dependent_launch(capability):
    options = dependent_launch.pdl_options(torch.device("cuda", 0))
    assert options == {"PDL": True, "launch_pdl": True}


def test_older_gpus_and_the_cpu_do_not(capability):
    capability["major"] = 8
    assert dependent_launch.pdl_options(torch.device("cuda", 0)) == {"PDL": False}
    capability["major"] = 9
    assert dependent_launch.pdl_options(torch.device("cpu")) == {"PDL": False}


def test_the_environment_turns_it_off(capability, monkeypatch):
    monkeypatch.setenv(DEPENDENT_LAUNCH_ENV, "0")
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))
    monkeypatch.setenv(DEPENDENT_LAUNCH_ENV, "1")
    assert dependent_launch.pdl_enabled(torch.device("cuda", 0))


@pytest.mark.parametrize("spelling", ["1", "true", "ON", "yes"])
def test_the_interpreter_never_gets_it(capability, monkeypatch, spelling):
    monkeypatch.setenv("TRITON_INTERPRET", spelling)  # every spelling triton accepts
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_rocm_gpus_do_not(capability, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm torch calls its GPUs "cuda"
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_a_triton_without_the_instructions_does_not(capability, monkeypatch):
    monkeypatch.setattr(dependent_launch, "HAVE_GDC", False)
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_a_bad_value_is_refused_at_start_up_naming_the_variable(monkeypatch):
    from ppruntime.config import ConfigError
    from ppruntime.model.layer_ops import select_layer_ops

    monkeypatch.setenv(DEPENDENT_LAUNCH_ENV, "sometimes")
    for name in ("triton", "torch"):
        with pytest.raises(ConfigError, match="PPRUNTIME_PDL='sometimes' is not a boolean"):
            select_layer_ops(name, torch.device("cpu"))


def test_the_compile_checks_catch_memory_touched_before_the_wait():
    from kernel_scripts.ptx_order import assert_waits_before_memory

    waits_first = "ld.param.u64 %rd1, [p];\ngriddepcontrol.wait;\nld.global.b32 %r1, [%rd1];"
    assert_waits_before_memory(waits_first, "ok")
    for early in ("ld.global.nc.b32 %r1, [%rd1];", "cp.async.cg.shared.global [%r2], [%rd1];"):
        with pytest.raises(AssertionError, match="before griddepcontrol.wait"):
            assert_waits_before_memory(early + "\n" + waits_first, "early")
    with pytest.raises(AssertionError, match="no griddepcontrol.wait"):
        assert_waits_before_memory("ld.global.b32 %r1, [%rd1];", "never")
