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
