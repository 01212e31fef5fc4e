"""The CPU runtime: the steady allocator setting and where it is applied."""
from __future__ import annotations

import ctypes
import platform
import sys

import pytest

from pipeline.model import runtime
from pipeline.params import TrainParams

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                           reason="steady_malloc sets glibc's allocator; this system has another C library")


@glibc
def test_steady_malloc_sets_glibcs_thresholds() -> None:
    assert runtime.steady_malloc() is True
    assert runtime.steady_malloc() is True   # setting it again in the same process is harmless


def test_steady_malloc_is_a_no_op_without_glibc(monkeypatch) -> None:
    def no_libc(*args, **kwargs):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert runtime.steady_malloc() is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.steady_malloc() is False


def test_the_cpu_runtime_applies_steady_malloc(monkeypatch) -> None:
    applied = []
    monkeypatch.setattr(runtime, "steady_malloc", lambda: applied.append(True) or True)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    threads = runtime.torch.get_num_threads()
    try:
        rt = runtime.setup_runtime(TrainParams(threads=1))
    finally:
        runtime.torch.set_num_threads(threads)
    assert rt.device.type == "cpu" and applied == [True]
