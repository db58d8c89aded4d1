"""_sys.fd_creation(): a Ctrl-C at either edge of the block is one KeyboardInterrupt, and
SIGINT is never left blocked in the thread (Ctrl-C would then do nothing for good)."""
import _thread
import signal

import pytest

from minivmm import _sys


def test_a_ctrl_c_at_either_edge_of_fd_creation_leaves_sigint_unblocked(monkeypatch):
    real_mask, real_signal = signal.pthread_sigmask, signal.signal

    # A Ctrl-C due just as the mask is set (pthread_sigmask runs pending handlers then),
    # and just as the program's handler is put back: the next check raises it
    def mask_then_ctrl_c(how, mask):
        old = real_mask(how, mask)
        if how == signal.SIG_BLOCK and set(mask) == {signal.SIGINT}:
            _thread.interrupt_main()
        return old

    def signal_then_ctrl_c(signum, handler):
        old = real_signal(signum, handler)
        if signum == signal.SIGINT and handler is signal.default_int_handler:
            _thread.interrupt_main()
        return old
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    for patch in ("pthread_sigmask", "signal"):
        with monkeypatch.context() as mp:
            mp.setattr(_sys.signal, patch, mask_then_ctrl_c if patch == "pthread_sigmask"
                       else signal_then_ctrl_c)
            made = []
            with pytest.raises(KeyboardInterrupt):
                with _sys.fd_creation():
                    made.append(1)
                    assert signal.SIGINT in real_mask(signal.SIG_BLOCK, ())
        assert made == [1], patch             # the interrupt came as the block ended
        blocked = signal.SIGINT in real_mask(signal.SIG_BLOCK, ())
        real_mask(signal.SIG_UNBLOCK, {signal.SIGINT})
        assert not blocked, f"SIGINT left blocked ({patch})"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
