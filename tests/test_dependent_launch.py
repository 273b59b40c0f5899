"""When kernels get programmatic dependent launch: CUDA devices of capability >= 9 only,
never interpreted, and $PPRUNTIME_PDL=0 turns it off. (That the kernels compile with it for
sm_90 is checked by kernel_compile_check.py and the attention compile script; that graphs
give the same bits with it on and off, by test_gpu_graphs.py on a GPU.)"""

from __future__ import annotations

import pytest
import torch

from ppruntime.kernels import dependent_launch


@pytest.fixture
def capability(monkeypatch):
    """Pretend to be a CUDA machine whose GPU has the capability set in the returned dict."""
    state = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (state["major"], 0))
    monkeypatch.setattr(dependent_launch, "HAVE_GDC", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(dependent_launch.PDL_ENV, raising=False)
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
    monkeypatch.setenv(dependent_launch.PDL_ENV, "0")
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))
    monkeypatch.setenv(dependent_launch.PDL_ENV, "1")
    assert dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_the_interpreter_never_gets_it(capability, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_a_triton_without_the_instructions_does_not(capability, monkeypatch):
    monkeypatch.setattr(dependent_launch, "HAVE_GDC", False)
    assert not dependent_launch.pdl_enabled(torch.device("cuda", 0))


def test_a_bad_value_is_refused_at_start_up_naming_the_variable(monkeypatch):
    from ppruntime.config import ConfigError
    from ppruntime.model.layer_ops import select_layer_ops

    monkeypatch.setenv(dependent_launch.PDL_ENV, "sometimes")
    for name in ("triton", "torch"):
        with pytest.raises(ConfigError, match="PPRUNTIME_PDL='sometimes' is not a boolean"):
            select_layer_ops(name, torch.device("cpu"))
