"""abi-check on a host whose smallest dirty ring is 1024 entries (stock kvm_intel with PML:
64 + 512 reserved entries round up to 16384 bytes). The kernel here has no PML, so
ring_limits is patched to report that minimum. The kernel itself still accepts less, so a
check that hard-codes a smaller ring may still pass: the ring sizes each check asks KVM for
are recorded and compared with the minimum."""
import ctypes
import sys

import pytest

from minivmm import Kvm, _sys, abi
from minivmm.abicheck import runner
from minivmm.dirty import ringsize

PML_MIN = 1024
RING_CAPS = (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
# Checks whose point is a too-small or invalid size (the kernel sees args[0] as a u32).
BAD_SIZE_CHECKS = {"ring.enable.zero", "ring.enable.not_pow2", "ring.enable.too_small",
                   "ring.enable.u32_truncation"}

REAL_RING_LIMITS = ringsize.ring_limits


def _pml_limits(kvm):
    lim = dict(REAL_RING_LIMITS(kvm))       # the real reserved_entries and max_entries
    lim["min_entries"] = max(lim["min_entries"], PML_MIN)
    return lim


def _patch_ring_limits(monkeypatch):
    """Every module that imported ring_limits by name sees the PML host's minimum, and
    ring.enable.sizes sees kvm_intel with pml=Y (what it holds that minimum to)."""
    from minivmm.abicheck import checks_ring_enable
    for name, mod in list(sys.modules.items()):
        if name.startswith("minivmm") and getattr(mod, "ring_limits", None) is REAL_RING_LIMITS:
            monkeypatch.setattr(mod, "ring_limits", _pml_limits)
    monkeypatch.setattr(checks_ring_enable, "vendor_module", lambda: "kvm_intel")
    monkeypatch.setattr(checks_ring_enable, "module_param",
                        lambda module, name, sysfs=None:
                        "Y" if (module, name) == ("kvm_intel", "pml") else None)


def _recording_tracer(sizes: list):
    """An ioctl stand-in that records the entries asked of every ring KVM_ENABLE_CAP
    (VM or vCPU fd), then issues the call as _sys.ioctl would."""
    def tracer(fd, request, arg, name, hints, run=None):
        if request == abi.KVM_ENABLE_CAP:
            cap = abi.kvm_enable_cap.from_address(arg)
            if cap.cap in RING_CAPS:
                sizes.append((cap.args[0] & 0xFFFFFFFF) // 16)
        ret = _sys._ioctl(fd, request, arg)
        if ret < 0:
            raise _sys.failure(fd, name, ctypes.get_errno(), hints)
        return ret
    return tracer


def _run_all(kvm, record=None) -> dict:
    """{id: (status, reason, ring sizes asked for)} of every check, each alone."""
    out = {}
    for spec in runner.select():
        sizes = []
        if record is not None:
            record.setattr(_sys, "tracer", _recording_tracer(sizes))
        try:
            res = runner.run_one(spec, kvm)
        finally:
            if record is not None:
                record.setattr(_sys, "tracer", None)
        out[spec.id] = (res.status, res.reason, sizes)
    return out


@pytest.fixture(scope="module")
def runs():
    with Kvm() as kvm:
        before = _run_all(kvm)
        with pytest.MonkeyPatch.context() as mp:
            _patch_ring_limits(mp)
            pml = _run_all(kvm, mp)
    return before, pml


def test_checks_pass_or_skip_as_before_on_a_pml_sized_host(runs):
    from tests.kvm.test_abicheck import KNOWN_KERNEL_BUGS    # may fail, pass or skip here
    before, pml = runs
    changed = {i: (before[i][:2], pml[i][:2]) for i in before
               if before[i][0] != pml[i][0] and i not in KNOWN_KERNEL_BUGS}
    assert not changed, changed
    failed = {i: r[1] for i, r in pml.items() if r[0] == "fail" and i not in KNOWN_KERNEL_BUGS}
    assert not failed, failed


def test_no_ring_below_the_host_minimum_except_where_that_is_the_point(runs):
    _, pml = runs
    small = {i: sorted(set(r[2])) for i, r in pml.items()
             if i not in BAD_SIZE_CHECKS and any(n < PML_MIN for n in r[2])}
    assert not small, f"ring sizes (entries) below {PML_MIN} asked for: {small}"
    asked = {i for i, r in pml.items() if r[2]}
    assert BAD_SIZE_CHECKS <= asked and len(asked) > 20, sorted(asked)


def test_after_vcpu_is_refused_for_the_vcpu_not_the_size(runs):
    _, pml = runs
    sizes = pml["ring.enable.after_vcpu"][2]
    assert sizes and min(sizes) >= PML_MIN, sizes


@pytest.mark.parametrize("release, named", [("6.13.7", True), ("6.14.0", False)])
def test_order_failure_names_the_known_pml_ordering_before_6_14(monkeypatch, release, named):
    from minivmm.abicheck import checks_entries
    from minivmm.abicheck.faults import FAULTS
    real = checks_entries.os.uname()
    monkeypatch.setattr(checks_entries, "pml_enabled", lambda: True)
    monkeypatch.setattr(checks_entries.os, "uname", lambda: type(real)(
        (real.sysname, real.nodename, release, real.version, real.machine)))
    spec = runner.REGISTRY["ring.entries.order"]
    with Kvm() as kvm:
        clean = runner.run_one(spec, kvm)
        with FAULTS["ring_offset_shift"]():        # out of order as the check sees it
            res = runner.run_one(spec, kvm)
    assert clean.status == "pass", clean.reason     # not skipped or weakened on PML hosts
    assert res.status == "fail"
    assert any("37c3ddfe5238" in d for d in res.diagnostics) == named, res.diagnostics


def _pml_batches_reversed(monkeypatch, release):
    """Host: Intel PML on ``release``; the shuffled rewrites of ring.entries.order (one PML
    batch, flushed at the guest's exit) come out newest-first, as vmx_flush_pml_buffer()
    pushed them before 37c3ddfe5238 (6.14). The first writes fault, so stay in order."""
    from minivmm.abicheck import checks_entries, ctx as ctxmod
    real = checks_entries.os.uname()
    monkeypatch.setattr(checks_entries, "pml_enabled", lambda: True)
    monkeypatch.setattr(checks_entries.os, "uname", lambda: type(real)(
        (real.sysname, real.nodename, release, real.version, real.machine)))
    real_harvest, calls = ctxmod.Ctx.harvest, []

    def harvest(self, ring):
        slots, offsets = real_harvest(self, ring)
        calls.append(1)
        return (slots[::-1], offsets[::-1]) if len(calls) == 2 else (slots, offsets)
    monkeypatch.setattr(ctxmod.Ctx, "harvest", harvest)
    return calls


@pytest.mark.parametrize("release, status", [("6.12.40", "pass"), ("6.14.0", "fail")])
def test_order_takes_newest_first_pml_batches_before_6_14(monkeypatch, release, status):
    # api.rst promises no order and 37c3ddfe5238 says the old order "usually doesn't
    # matter": a 6.12 LTS kvm_intel host with PML failed ring.entries.order for it
    calls = _pml_batches_reversed(monkeypatch, release)
    with Kvm() as kvm:
        res = runner.run_one(runner.REGISTRY["ring.entries.order"], kvm)
    assert len(calls) == 2
    assert res.status == status, res.reason
    if status == "pass":
        assert any("newest-first" in d for d in res.diagnostics), res.diagnostics


def test_reversed_batches_only_accepts_whole_batches_reversed():
    from minivmm.abicheck.checks_entries import _reversed_batches
    want = [3, 7, 1, 9, 0]
    assert _reversed_batches([0, 9, 1, 7, 3], want)            # one batch
    assert _reversed_batches([7, 3, 0, 9, 1], want)            # two batches
    assert _reversed_batches(want, want)                       # batches of one
    assert _reversed_batches([3, 1, 7, 9, 0], want)            # batches [3], [7, 1], ...
    assert not _reversed_batches([1, 3, 7, 9, 0], want)        # not a batch reversed
    assert not _reversed_batches([0, 9, 1, 7], want)           # a page missing
    assert not _reversed_batches([0, 9, 1, 7, 3, 4], want)     # a page extra


def test_a_pml_host_whose_vendor_module_sysfs_does_not_show_passes_sizes(monkeypatch):
    # no /sys/module/kvm_intel (sysfs not mounted in a container): the vendor is
    # "unknown", and ring.enable.sizes demanded exactly one page, failing a correct PML host
    from minivmm.abicheck import checks_ring_enable
    _patch_ring_limits(monkeypatch)
    monkeypatch.setattr(checks_ring_enable, "vendor_module", lambda: "unknown")
    monkeypatch.setattr(checks_ring_enable, "module_param", lambda *a, **k: None)
    with Kvm() as kvm:
        res = runner.run_one(runner.REGISTRY["ring.enable.sizes"], kvm)
    assert res.status == "pass", res.reason
