"""Dirty-page tracking: the per-vCPU dirty ring and the KVM_GET_DIRTY_LOG bitmap.

Mirrors Documentation/virt/kvm/api.rst 7.36 (KVM_CAP_DIRTY_LOG_RING), 4.8
(KVM_GET_DIRTY_LOG), 4.117 (KVM_CLEAR_DIRTY_LOG) and 7.18
(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
"""
