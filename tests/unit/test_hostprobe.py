"""Host detection without KVM: the ring-minimum probe against a fake kernel, `caps` notes
from a fake /sys/module tree, and the decoding of entry failures and internal errors."""
import errno
import types

import pytest

from minivmm import abi, cli
from minivmm._sys import KvmError
from minivmm.dirty import ringsize
from minivmm.vcpu import Vcpu, entry_failure_meaning

MAX_BYTES = 65536 * 16


def fake_sysfs(root, params: dict):
    """{"kvm_intel": {"pml": "Y"}, ...} as /sys/module/<module>/parameters/<name> files."""
    for module, values in params.items():
        d = root / module / "parameters"
        d.mkdir(parents=True)
        for name, value in values.items():
            (d / name).write_text(f"{value}\n")
    return str(root)


@pytest.fixture
def no_pml(tmp_path, monkeypatch):
    """ring_limits reads sysfs for its computed reserve: an empty tree here."""
    monkeypatch.setattr(ringsize, "SYSFS_MODULES", str(tmp_path / "empty"))


class FakeVm:
    def __init__(self, kvm):
        self.kvm, self.closed = kvm, False

    def enable_cap(self, cap, size, hints=None):
        self.kvm.asked.append((cap, size))
        if size < self.kvm.min_bytes:
            raise KvmError("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)", self.kvm.refusal)
        return 0

    def close(self):
        self.closed = True


class FakeKvm:
    """A kernel whose smallest ring is ``min_bytes`` (EINVAL below, like
    kvm_vm_ioctl_enable_dirty_log_ring())."""

    def __init__(self, min_bytes=4096, acq=MAX_BYTES, plain=MAX_BYTES, refusal=errno.EINVAL):
        self.min_bytes, self.refusal = min_bytes, refusal
        self.cap_values = {abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL: acq,
                           abi.KVM_CAP_DIRTY_LOG_RING: plain}
        self.asked, self.vms = [], []

    def check_extension(self, cap):
        return self.cap_values.get(cap, 0)

    def create_vm(self):
        self.vms.append(FakeVm(self))
        return self.vms[-1]


# -- the ring minimum --

@pytest.mark.parametrize("min_bytes, entries, reserved", [
    (4096, 256, 64), (16384, 1024, 576), (65536, 4096, 2049)])
def test_ring_limits_measures_the_minimum_one_vm_per_try(no_pml, min_bytes, entries, reserved):
    kvm = FakeKvm(min_bytes)
    lim = ringsize.ring_limits(kvm)
    assert lim == {"min_entries": entries, "max_entries": 65536, "reserved_entries": reserved,
                   "min_source": "measured"}
    sizes = [s for _, s in kvm.asked]
    assert sizes == [4096 << i for i in range(len(sizes))] and sizes[-1] == min_bytes
    assert len(kvm.vms) == len(sizes) and all(vm.closed for vm in kvm.vms)
    assert {c for c, _ in kvm.asked} == {abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL}


def test_ring_limits_is_cached_per_kvm_and_returns_copies(no_pml):
    kvm = FakeKvm(16384)
    first = ringsize.ring_limits(kvm)
    first["min_entries"] = 1             # a caller's change does not reach the cache
    assert ringsize.ring_limits(kvm)["min_entries"] == 1024
    assert len(kvm.vms) == 3
    other = FakeKvm(4096)                # another Kvm object measures for itself
    assert ringsize.ring_limits(other)["min_entries"] == 256


def test_plain_ring_capability_is_probed_when_acq_rel_is_absent(no_pml):
    kvm = FakeKvm(8192, acq=0)
    assert ringsize.ring_limits(kvm)["min_entries"] == 512
    assert {c for c, _ in kvm.asked} == {abi.KVM_CAP_DIRTY_LOG_RING}


def test_without_a_ring_capability_the_minimum_is_computed(no_pml):
    kvm = FakeKvm(acq=0, plain=0)
    assert ringsize.ring_limits(kvm) == {"min_entries": 256, "max_entries": 0,
                                         "reserved_entries": 64, "min_source": "computed"}
    assert not kvm.vms


def test_every_size_refused_falls_back_uncached(no_pml):
    kvm = FakeKvm(min_bytes=1 << 40)
    assert ringsize.ring_limits(kvm)["min_source"] == "computed"
    assert [s for _, s in kvm.asked][-1] == MAX_BYTES     # bounded by the capability
    ringsize.ring_limits(kvm)
    assert len(kvm.vms) == 2 * len(range(12, 21))          # 4 KiB .. 1 MiB, asked again


def test_other_errors_are_raised_naming_the_ioctl(no_pml):
    kvm = FakeKvm(16384, refusal=errno.ENOMEM)
    with pytest.raises(KvmError) as e:
        ringsize.measure_min_bytes(kvm, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, MAX_BYTES)
    assert e.value.errno == errno.ENOMEM and "KVM_ENABLE_CAP" in str(e.value)
    assert all(vm.closed for vm in kvm.vms)


@pytest.mark.parametrize("where", ["enable", "create"])
def test_a_probe_that_cannot_run_falls_back_to_the_computed_minimum(no_pml, where):
    # No VM to probe with (EMFILE, ENOMEM, a VM limit) must not break caps or a ring enable
    kvm = FakeKvm(16384, refusal=errno.ENOMEM)
    if where == "create":
        def create_vm():
            raise KvmError("KVM_CREATE_VM", errno.EMFILE)
        kvm.create_vm = create_vm
    lim = ringsize.ring_limits(kvm)
    assert lim["min_entries"] == 256 and lim["reserved_entries"] == 64
    assert lim["min_source"].startswith("computed (probe failed: KVM_")
    assert all(vm.closed for vm in kvm.vms)


@pytest.mark.parametrize("measured, computed, reserved", [
    (256, 64, 64),        # this host
    (1024, 576, 576),     # kvm_intel with PML, sysfs agrees
    (1024, 64, 576),      # a PML-sized log sysfs did not show
    (256, 576, 64),       # a pml parameter the kernel does not count
    (2048, 64, 1025),     # unexplained: the least reserve that forbids 1024
    (512, 576, 257),      # unexplained, with PML on: not 576, more than the 512 accepted
])
def test_reserved_entries_agree_with_the_measured_minimum(measured, computed, reserved):
    assert ringsize.reserved_for(measured, computed) == reserved
    assert ringsize.min_entries_for(reserved) == measured


def test_pml_enabled_reads_kvm_intel_and_kvm_amd(tmp_path):
    assert not ringsize.pml_enabled(str(tmp_path))
    assert ringsize.pml_enabled(fake_sysfs(tmp_path / "i", {"kvm_intel": {"pml": "Y"}}))
    assert ringsize.pml_enabled(fake_sysfs(tmp_path / "a", {"kvm_amd": {"pml": "1"}}))
    assert not ringsize.pml_enabled(fake_sysfs(tmp_path / "n", {"kvm_amd": {"pml": "N"}}))


# -- caps notes --

INTEL_STOCK = {"pml": "Y", "unrestricted_guest": "Y", "ept": "Y", "eptad": "Y"}


def _notes(tmp_path, vendor, params):
    return cli.host_notes(vendor, fake_sysfs(tmp_path, {vendor: params}))


def test_kvm_intel_notes_follow_its_parameters(tmp_path):
    notes = _notes(tmp_path / "stock", "kvm_intel", INTEL_STOCK)
    assert len(notes) == 3
    assert "pml is on" in notes[0] and "1024 entries" in notes[0]
    assert "eptad are on" in notes[1] and "system slot every iteration" in notes[1]
    assert "RIP still at" in notes[2] and "kvm_fast_pio_out()" in notes[2]
    odd = _notes(tmp_path / "odd", "kvm_intel",
                 {"pml": "N", "unrestricted_guest": "N", "ept": "Y", "eptad": "N"})
    assert "pml is off" in odd[0] and "256 entries" in odd[0]
    assert "unrestricted_guest is off" in odd[1] and "below the data slot" in odd[1]
    assert not any("eptad" in n for n in odd) and len(odd) == 3


def test_kvm_amd_notes(tmp_path):
    notes = _notes(tmp_path / "a", "kvm_amd", {"npt": "1"})
    assert len(notes) == 2 and not any("pml" in n for n in notes)
    assert "shutdown_interception()" in notes[0] and "reset state" in notes[0]
    assert notes[1].startswith("SVM:") and "past it" in notes[1]
    pml = _notes(tmp_path / "b", "kvm_amd", {"pml": "Y"})
    assert pml[0].startswith("kvm_amd.pml is on") and len(pml) == 3


def test_missing_parameters_make_no_notes_and_pvm_keeps_its_own(tmp_path):
    notes = cli.host_notes("kvm_intel", str(tmp_path))     # no parameters directory
    assert len(notes) == 1 and "RIP still at" in notes[0]
    pvm = cli.host_notes("kvm_pvm", str(tmp_path))
    assert len(pvm) == 1 and pvm[0].startswith("kvm_pvm (software virtualization)")
    assert cli.host_notes("unknown", str(tmp_path)) == []


def test_each_note_is_one_sentence(tmp_path):
    for vendor, params in (("kvm_intel", {**INTEL_STOCK, "unrestricted_guest": "N"}),
                           ("kvm_amd", {"pml": "Y"})):
        for note in _notes(tmp_path / vendor, vendor, params):
            assert note.count(". ") == 0 and not note.endswith("."), note


# -- entry failures and internal errors --

@pytest.mark.parametrize("reason, words", [
    (0x80000021, ("invalid guest state", "kvm_intel.dump_invalid_vmcs=1")),
    (0x80000022, ("MSR loading",)),
    (0x80000029, ("machine-check",)),
    (0x80000030, ("VM-entry failure", "basic exit reason 48")),
    (0xFFFFFFFFFFFFFFFF, ("invalid VMCB state", "kvm_amd.dump_invalid_vmcb=1")),
    (0xFFFFFFFF, ("invalid VMCB state",)),
    (7, ("VM-instruction error 7", "invalid control field")),
    (0x1234, ("unknown entry failure reason 0x1234",)),
])
def test_entry_failure_meaning(reason, words):
    text = entry_failure_meaning(reason)
    assert all(w in text for w in words), text


def _describe(run, reason):
    return Vcpu.describe_exit(types.SimpleNamespace(run_struct=run), reason)


def test_fail_entry_exit_is_decoded():
    run = abi.kvm_run(exit_reason=abi.KVM_EXIT_FAIL_ENTRY)
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x80000021, 3
    info = _describe(run, abi.KVM_EXIT_FAIL_ENTRY)
    assert info["hardware_entry_failure_reason"] == 0x80000021 and info["cpu"] == 3
    assert "invalid guest state" in info["meaning"]


@pytest.mark.parametrize("sub, name", [(1, "KVM_INTERNAL_ERROR_EMULATION"),
                                       (2, "KVM_INTERNAL_ERROR_SIMUL_EX"),
                                       (3, "KVM_INTERNAL_ERROR_DELIVERY_EV"),
                                       (4, "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"),
                                       (9, "unknown")])
def test_internal_error_names_its_suberror(sub, name):
    run = abi.kvm_run(exit_reason=abi.KVM_EXIT_INTERNAL_ERROR)
    run.internal.suberror, run.internal.ndata, run.internal.data[0] = sub, 1, 0x80000b0e
    info = _describe(run, abi.KVM_EXIT_INTERNAL_ERROR)
    assert info["suberror"] == sub and info["suberror_name"] == name
    assert info["data"] == [0x80000b0e] and info["meaning"]
