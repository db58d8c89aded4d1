"""GuestMemory used after close says what happened, whoever closed it."""
import pytest

from minivmm.memory import GuestMemory


def test_a_closed_standalone_mapping_does_not_blame_a_vm():
    # tutorial chapter 2 maps memory of its own and closes it itself: no VM was closed
    mem = GuestMemory(0, 0, 0x2000)
    mem.close()
    for use in (lambda: mem.read(0, 1), lambda: mem.write(0, b"x"), lambda: mem.contains(0)):
        with pytest.raises(ValueError, match=r"^slot0 is closed: its mapping was released "
                                             r"\(close\(\), Vm.remove_memory\(\) or its "
                                             r"VM's close\(\)\)$"):
            use()
