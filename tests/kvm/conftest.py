"""Every test in tests/kvm/ needs a usable /dev/kvm."""
import os

import pytest

from tests.conftest import kvm_available


@pytest.fixture(autouse=True)
def _needs_kvm():
    ok, why = kvm_available()
    if not ok:
        if os.environ.get("MINIVMM_REQUIRE_KVM") == "1":
            pytest.fail(f"MINIVMM_REQUIRE_KVM=1 but KVM is not usable: {why}")
        pytest.skip(f"needs KVM: {why}")
