"""Dirty-ring size rules, checked before the kernel is asked.

Mirrors ``kvm_vm_ioctl_enable_dirty_log_ring()`` in virt/kvm/kvm_main.c and
``kvm_dirty_ring_get_rsvd_entries()`` in virt/kvm/dirty_ring.c: the size in
bytes must be a power of two, at least one page and at least the reserved
entries (64, plus a hardware log such as Intel PML's 512), and at most the
capability's value (KVM_DIRTY_RING_MAX_ENTRIES x 16 bytes). abi.md rules 7-11.

The smallest size is measured on the running kernel (``measure_min_bytes``), not
inferred from module parameters: the reserve depends on kvm_cpu_dirty_log_size(),
which each vendor module (and each kernel version) answers for itself.
"""
from __future__ import annotations

import errno
import os
import weakref

from .. import abi
from .._sys import KvmError

ENTRY_BYTES = 16
PAGE = 4096
PML_ENTRIES = 512
SYSFS_MODULES = "/sys/module"

# One measurement per Kvm object: ring_limits() is called at every DirtySession, CLI
# command and abi-check ring, and each probe costs a few KVM_CREATE_VMs.
_measured: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def module_param(module: str, name: str, sysfs: str | None = None) -> str | None:
    """/sys/module/<module>/parameters/<name>, stripped; None when absent or unreadable.
    ``sysfs`` (default SYSFS_MODULES, read at call time) lets tests hand in a fake tree."""
    try:
        with open(os.path.join(sysfs or SYSFS_MODULES, module, "parameters", name)) as f:
            return f.read().strip()
    except OSError:
        return None


def param_on(value: str | None) -> bool:
    """A bool module parameter reads Y/N (param_get_bool); some are ints."""
    return value is not None and value in ("Y", "y", "1")


def pml_enabled(sysfs: str | None = None) -> bool:
    """A PML log adds 512 reserved entries (kvm_cpu_dirty_log_size()): kvm_intel's ``pml``,
    and kvm_amd's once the SVM PML series ("KVM: SVM: Add Page modification logging
    support") is in. Both read back the effective value (cleared at hardware setup when
    the CPU lacks it)."""
    return any(param_on(module_param(m, "pml", sysfs)) for m in ("kvm_intel", "kvm_amd"))


def min_entries_for(reserved: int) -> int:
    """The smallest ring the kernel accepts with ``reserved`` entries held back: one page,
    or the reserve rounded up to a power of two."""
    min_bytes = max(PAGE, reserved * ENTRY_BYTES)
    return (1 << (min_bytes - 1).bit_length()) // ENTRY_BYTES


def reserved_for(min_entries: int, computed: int) -> int:
    """The reserve consistent with a measured minimum, ``computed`` being 64 (+ 512 when a
    PML parameter says so).

    The measurement only bounds the reserve: a minimum of M > 256 entries means the
    kernel's reserve is in (M/2, M]; 256 means at most 256. So the first candidate that
    predicts exactly M is taken: the computed value; else 64 + 512, a PML-sized log sysfs
    did not show (kvm_amd before its ``pml`` parameter is read, another vendor module);
    else 64 alone (a PML parameter that is on while the kernel does not count it). Only a
    minimum that none explains falls back to M/2 + 1, the least the kernel can reserve.
    Soft-full checks predict entries - reserve, so a wrong guess shows up there."""
    for rsvd in (computed, abi.KVM_DIRTY_RING_RSVD_ENTRIES + PML_ENTRIES,
                 abi.KVM_DIRTY_RING_RSVD_ENTRIES):
        if min_entries_for(rsvd) == min_entries:
            return rsvd
    # not max(computed, ...): a computed reserve that matched none is at most M/2
    # or above M, and one above M says the measured ring cannot exist
    return min_entries // 2 + 1


def measure_min_bytes(kvm, cap: int, max_bytes: int) -> int | None:
    """The smallest ring size (bytes) KVM_ENABLE_CAP(cap) accepts, trying one page and
    doubling up to ``max_bytes``; None when every size is refused with EINVAL.

    Each try needs a fresh VM: the capability can be enabled once per VM (EINVAL
    afterwards, kvm_vm_ioctl_enable_dirty_log_ring()). EINVAL is the only answer that
    means "too small" here (sizes are powers of two, >= a page, <= the max, and no vCPU
    exists); any other failure is raised as the KvmError naming the ioctl."""
    size = PAGE
    while size <= max_bytes:
        vm = kvm.create_vm()
        try:
            vm.enable_cap(cap, size)
            return size
        except KvmError as e:
            if e.errno != errno.EINVAL:
                raise
        finally:
            vm.close()
        size *= 2
    return None


def _computed_limits(max_bytes: int) -> dict:
    rsvd = abi.KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTRIES if pml_enabled() else 0)
    return {"min_entries": min_entries_for(rsvd), "max_entries": max_bytes // ENTRY_BYTES,
            "reserved_entries": rsvd, "min_source": "computed"}


def ring_limits(kvm) -> dict:
    """min/max entries for this host, and the reserved (soft-limit) margin.

    ``min_source`` says whether min_entries was measured on this kernel ("measured") or
    computed from module parameters because no probe could run ("computed": no dirty
    ring capability, or no size was accepted)."""
    cached = _measured.get(kvm)
    if cached is not None:
        return dict(cached)
    acq = kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    plain = kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING)
    max_bytes = max(acq, plain)
    limits = _computed_limits(max_bytes)
    if max_bytes <= 0:
        return limits
    # the capability minivmm enables (ACQ_REL first); both share one size rule
    cap, cap_max = (abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq) if acq > 0 else \
        (abi.KVM_CAP_DIRTY_LOG_RING, plain)
    try:
        min_bytes = measure_min_bytes(kvm, cap, cap_max)
    except KvmError as e:    # no VM to probe with (EMFILE, ENOMEM...): what the modules say
        limits["min_source"] = f"computed (probe failed: {e})"
        return limits
    if min_bytes is None:
        return limits        # not cached: a kernel (or an injected fault) refusing every size
    entries = min_bytes // ENTRY_BYTES
    limits.update(min_entries=entries, min_source="measured",
                  reserved_entries=reserved_for(entries, limits["reserved_entries"]))
    _measured[kvm] = limits
    return dict(limits)


def validate_entries(entries: int, limits: dict) -> None:
    """Raise ValueError with the reason when ``entries`` is not a usable ring size."""
    if isinstance(entries, bool) or not isinstance(entries, int):   # not a '<=' TypeError
        raise TypeError(f"ring size must be an int, not {type(entries).__name__}")
    if entries <= 0 or entries & (entries - 1):
        raise ValueError(f"ring size {entries} is not a power of two")
    if limits["max_entries"] == 0:
        raise ValueError("this kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
    if entries < limits["min_entries"]:
        raise ValueError(f"ring size {entries} is too small: at least {limits['min_entries']} "
                         f"entries ({limits['reserved_entries']} are reserved by KVM)")
    if entries > limits["max_entries"]:
        raise ValueError(f"ring size {entries} is too large: at most {limits['max_entries']} "
                         "entries (KVM_CAP_DIRTY_LOG_RING)")
