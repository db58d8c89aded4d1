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


def test_an_error_code_is_shown_only_where_the_cpu_pushes_one():
    # the stub pushes a 0 for #DE, #BP, #UD...: "error code 0x0" there was the stub's, not
    # the CPU's (SDM vol. 3, table 6-1)
    de = VcpuEnd("exception", vector=0, rip=0x10007, instruction="div ecx  ; line 4",
                 detail={"error_code": 0, "cr2": 0})
    assert de.summary() == "CPU exception #DE divide error at 0x10007 (div ecx  ; line 4)"
    gp = VcpuEnd("exception", vector=13, rip=0x10014, instruction="hlt  ; line 12",
                 detail={"error_code": 0, "cr2": 0})
    assert gp.summary() == ("CPU exception #GP general protection, error code 0x0 at 0x10014 "
                            "(hlt  ; line 12)")
