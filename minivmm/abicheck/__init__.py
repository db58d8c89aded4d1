"""minivmm abi-check: numbered, cited regression checks of KVM's dirty-log ABI.

Mirrors the rules of Documentation/virt/kvm/api.rst 4.8, 4.35, 4.37, 4.117, 7.18
and 7.36 and the behaviour of virt/kvm/dirty_ring.c and virt/kvm/kvm_main.c, as
numbered in docs/abi.md section 3. Results are reported in KTAP
(Documentation/dev-tools/ktap.rst), the format of the kernel's own selftests.
"""
