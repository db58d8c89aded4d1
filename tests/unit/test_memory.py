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


@pytest.mark.parametrize("use,text", [
    # each was Python's own error from inside ("'<=' not supported between instances of
    # 'int' and 'str'", "slice indices must be integers"), or taken as given: a bool read
    # at address 1, a float 0.5 was "contained"
    (lambda m: m.read("0", 1), "gpa must be an int, not str"),
    (lambda m: m.read(0.0, 1), "gpa must be an int, not float"),
    (lambda m: m.read(True, 1), "gpa must be an int, not bool"),
    (lambda m: m.read(0, 1.5), "length must be an int, not float"),
    (lambda m: m.read(0, True), "length must be an int, not bool"),
    (lambda m: m.write("0", b"x"), "gpa must be an int, not str"),
    (lambda m: m.write(1.0, b"x"), "gpa must be an int, not float"),
    (lambda m: m.write(0, "text"), "data must be a bytes-like object, not str"),
    (lambda m: m.contains(0.5), "gpa must be an int, not float"),
    (lambda m: m.contains(None), "gpa must be an int, not NoneType"),
    (lambda m: m.contains(0, "1"), "length must be an int, not str"),
])
def test_wrong_types_are_named(use, text):
    with GuestMemory(0, 0, 0x2000) as mem:
        with pytest.raises(TypeError) as info:
            use(mem)
        assert str(info.value) == text and info.value.argument == text.split()[0]


def test_integer_numpy_scalars_still_address_memory():
    # a page of a DirtyRecord's data_pages is one: reading it is what a caller does
    np = pytest.importorskip("numpy")
    with GuestMemory(0, 0, 0x2000) as mem:
        mem.write(np.uint64(0x1000), b"ab")
        assert mem.read(np.int64(0x1000), np.uint32(2)) == b"ab"
        assert mem.contains(np.int64(0x1fff)) and not mem.contains(np.int64(0x2000))
