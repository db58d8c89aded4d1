"""VcpuEnd.summary(): the one line `minivmm run` prints for how a vCPU ended (no KVM needed)."""
from minivmm.machine import VcpuEnd


def test_internal_error_says_what_kvm_meant():
    # the suberror was only in --json: the text said just "internal-error at ..."
    end = VcpuEnd("internal-error", rip=0x10007, instruction="int3  ; line 3",
                  detail={"suberror": 1, "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
                          "meaning": "KVM could not emulate an instruction"})
    assert end.summary() == ("internal-error (KVM_INTERNAL_ERROR_EMULATION: KVM could not "
                             "emulate an instruction) at 0x10007 (int3  ; line 3)")


def test_fail_entry_names_the_hardware_reason():
    end = VcpuEnd("fail-entry", rip=0x10000,
                  detail={"hardware_entry_failure_reason": 0x21, "cpu": 0,
                          "meaning": "invalid guest state"})
    assert end.summary() == "fail-entry (0x21: invalid guest state) at 0x10000"


def test_a_host_error_keeps_its_own_text():
    end = VcpuEnd("host-error", detail={"error": "ValueError: boom", "meaning": "x"})
    assert end.summary() == "host-error: ValueError: boom"
