"""Torch threads are chosen against the jobs already running on the machine."""

from __future__ import annotations

import os

import pytest
import torch

from deepclust import runtime


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_busy_machine_gets_one_thread_and_a_warning(monkeypatch, caplog, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 2.0, 1.0))  # two other jobs on 2 cores
    torch.set_num_threads(2)
    with caplog.at_level("WARNING"):
        assert runtime.choose_threads(None) == 1
    assert torch.get_num_threads() == 1
    assert "other jobs keep 2.4 of 2 cores busy: using 1 torch thread(s) instead of 2" in caplog.text


def test_idle_machine_keeps_torchs_threads(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    torch.set_num_threads(2)
    assert runtime.choose_threads(None) == 2


def test_requested_threads_and_the_users_omp_setting_win(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert runtime.choose_threads(2) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.choose_threads(None) == 2  # the user said how many: not second-guessed
    with pytest.raises(ValueError, match="threads must be at least 1"):
        runtime.choose_threads(0)


def test_bf16_autocast_is_used_where_the_device_runs_it_natively(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    assert runtime.native_bf16(torch.device("cuda"))
    assert runtime.autocast_dtype(torch.device("cuda"), True) is torch.bfloat16
    assert runtime.autocast_dtype(torch.device("cuda"), False) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: emulated bf16
    assert not runtime.native_bf16(torch.device("cuda"))
    with caplog.at_level("WARNING"):
        assert runtime.autocast_dtype(torch.device("cuda"), True) is None
    assert "compute capability 7.0) has no native bf16: training in float32" in caplog.text
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not runtime.native_bf16(torch.device("cpu"))  # emulated bf16 is slower than fp32: stay in fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.native_bf16(torch.device("cpu"))
