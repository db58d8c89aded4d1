"""Every test in tests/kvm/ needs a usable /dev/kvm."""
import os

import pytest

from tests.conftest import kvm_available


def small_ring(at_least: int = 256) -> int:
    """Entries of the smallest dirty ring this host accepts, at least ``at_least``: 256
    here, 1024 on kvm_intel with PML (576 reserved entries, rounded up)."""
    from minivmm import Kvm
    from minivmm.dirty.ringsize import ring_limits
    with Kvm() as kvm:
        return max(at_least, ring_limits(kvm)["min_entries"])


@pytest.fixture(autouse=True)
def _needs_kvm():
    ok, why = kvm_available()
    if not ok:
        if os.environ.get("MINIVMM_REQUIRE_KVM") == "1":
            pytest.fail(f"MINIVMM_REQUIRE_KVM=1 but KVM is not usable: {why}")
        pytest.skip(f"needs KVM: {why}")


# The x86 INIT state's RIP, CS selector and CS base (SDM vol. 3, 10.1.4)
_INIT = (0xFFF0, 0xF000, 0xFFFF0000)


def kvm_resets_at_shutdown() -> bool:
    """Whether this host's KVM puts the vCPU in the INIT state before it returns the
    KVM_EXIT_SHUTDOWN of the triple_fault payload, read from the raw registers at that
    exit (not through Machine.reset_by_kvm, which the tests check). svm.c
    shutdown_interception() does (clear_page(vmcb), kvm_vcpu_reset(vcpu, true)) when the
    CPU itself shut down; vmx.c handle_triple_fault(), a triple fault KVM raises itself
    (KVM_REQ_TRIPLE_FAULT in x86.c vcpu_enter_guest()) and kvm_pvm keep the registers.
    Not cached: a test simulating the other host (shutdown_like_svm) asks it too."""
    from minivmm import abi
    from minivmm.machine import Machine
    from tests.conftest import payload
    seen = []

    def trace(st, reason):
        if reason == abi.KVM_EXIT_SHUTDOWN:
            regs, sregs = st.vcpu.get_regs(), st.vcpu.get_sregs()
            seen.append((regs.rip, sregs.cs.selector, sregs.cs.base) == _INIT)
    with Machine(payload("triple_fault")) as m:
        m.trace = trace
        m.run(timeout=20)
    assert seen, "triple_fault ended without a KVM_EXIT_SHUTDOWN"
    return seen[0]


def shutdown_like_svm(monkeypatch) -> None:
    """Simulate SVM for this test: every KVM_RUN that returns KVM_EXIT_SHUTDOWN leaves the
    vCPU in the INIT state, as svm.c shutdown_interception() does."""
    from minivmm import abi
    from minivmm.vcpu import Vcpu
    from tests.kvm.test_machine import reset_like_svm
    real = Vcpu.run

    def run(self):
        reason = real(self)
        if reason == abi.KVM_EXIT_SHUTDOWN:
            reset_like_svm(self)
        return reason
    monkeypatch.setattr(Vcpu, "run", run)


def start_thread_named(thread: str, vcpus: int = 2) -> None:
    """Run what starts the thread named ``thread`` ("vcpu1", "reaper", "step-watchdog"):
    a Machine of ``vcpus`` spinning vCPUs, an async DirtySession, or a StepSession."""
    from minivmm import DirtySession
    from minivmm.machine import Machine
    from minivmm.step import StepSession
    from tests.conftest import payload
    if thread == "vcpu1":
        with Machine(payload("spin"), vcpus=vcpus) as m:
            m.run(timeout=10)
    elif thread == "reaper":
        with DirtySession(payload("dirty_seq"), tracker="bitmap", vcpus=2, pages=64,
                          iterations=0, collect="async") as s:
            s.run(timeout=10)
    else:
        with StepSession(payload("hello_long")) as s:
            list(s.run(count=3))
