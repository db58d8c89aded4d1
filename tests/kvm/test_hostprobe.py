"""The smallest dirty ring, measured on the running kernel, and `minivmm caps` following it."""
import errno
import io
import json

import pytest

from minivmm import Kvm, abi, cli, trace
from minivmm._sys import KvmError
from minivmm.dirty import ringsize
from minivmm.vm import Vm

RING_CAPS = (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)


def _ring_sizes_asked(monkeypatch) -> list:
    """Every ring KVM_ENABLE_CAP from now on, in bytes (the call itself goes through)."""
    sizes, real = [], Vm.enable_cap

    def enable_cap(self, cap, *args, **kw):
        if cap in RING_CAPS:
            sizes.append(args[0])
        return real(self, cap, *args, **kw)
    monkeypatch.setattr(Vm, "enable_cap", enable_cap)
    return sizes


def test_the_minimum_is_measured_here(monkeypatch):
    sizes = _ring_sizes_asked(monkeypatch)
    with Kvm() as kvm:
        if not kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING):
            pytest.skip("no dirty ring on this kernel")
        lim = ringsize.ring_limits(kvm)
        asked = list(sizes)
        again = ringsize.ring_limits(kvm)
    assert lim["min_source"] == "measured" and again == lim
    assert sizes == asked and asked[-1] == lim["min_entries"] * 16   # probed once, cached
    # the kernel rule on what sysfs says: 256 entries here (kvm_pvm, no PML)
    assert lim["min_entries"] == (1024 if ringsize.pml_enabled() else 256)
    assert lim["reserved_entries"] == (576 if ringsize.pml_enabled() else 64)


def test_the_probe_shows_in_the_ioctl_trace():
    out = io.StringIO()
    with Kvm() as kvm, trace.tracing(out):
        ringsize.ring_limits(kvm)
    text = out.getvalue()
    assert "KVM_CREATE_VM" in text and "KVM_ENABLE_CAP" in text, text


def _pml_sized_kernel(monkeypatch):
    """A kernel that refuses rings below 16384 bytes with EINVAL, as kvm_intel with PML
    does (64 + 512 reserved entries round up to 1024)."""
    real = Vm.enable_cap

    def enable_cap(self, cap, *args, **kw):
        if cap in RING_CAPS and args[0] < 16384:
            raise KvmError(f"KVM_ENABLE_CAP({abi.CAP_NAMES[cap]})", errno.EINVAL)
        return real(self, cap, *args, **kw)
    monkeypatch.setattr(Vm, "enable_cap", enable_cap)


def test_a_pml_sized_minimum_is_measured_not_assumed(monkeypatch):
    _pml_sized_kernel(monkeypatch)
    with Kvm() as kvm:
        lim = ringsize.ring_limits(kvm)
    assert lim["min_entries"] == 1024 and lim["min_source"] == "measured"
    assert lim["reserved_entries"] == 576          # 1024 implies a PML-sized reserve


def test_caps_json_follows_the_measured_minimum(monkeypatch, capsys):
    _pml_sized_kernel(monkeypatch)
    assert cli.main(["caps", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ring"]["min_entries"] == 1024 and rep["ring"]["reserved_entries"] == 576
    assert "1024 to" in rep["dirty_ring_verdict"]
    mismatch = [n for n in rep["notes"] if "measured here is 1024" in n]
    assert bool(mismatch) == (not ringsize.pml_enabled()), rep["notes"]
