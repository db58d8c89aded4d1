"""The signal that kicks a vCPU thread out of KVM_RUN (api.rst 4.10 KVM_RUN, EINTR; with
``kvm_run.immediate_exit``, api.rst 5). Not a kernel structure: KVM only needs a signal
with a handler to be pending for the thread.

Kept free of heavy imports so that ``import minivmm`` installs the handler at once: only
the main thread may install one, while a Machine may be made in any thread.
"""
import signal
import threading

KICK_SIGNAL = signal.SIGUSR1


def _no_op(signum, frame):  # the kick only needs KVM_RUN to see a pending signal
    pass


def install_kick_handler(let_in: bool = False) -> bool:
    """Install a handler for the kick signal unless the program has its own (only the
    main thread may do this). ``let_in``: also let the kick into the calling thread, which
    runs a vCPU itself (the stepper): a thread started from a vCPU callback inherits that
    thread's all-blocked mask (Machine._vcpu_thread). Returns True when the kick was
    blocked there, so that the caller can block it again when done: the program's own
    mask is left as it was."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("minivmm must install its SIGUSR1 handler from the main thread: "
                               "import minivmm there first")
        signal.signal(KICK_SIGNAL, _no_op)
    if not let_in:
        return False
    return KICK_SIGNAL in signal.pthread_sigmask(signal.SIG_UNBLOCK, (KICK_SIGNAL,))

if threading.current_thread() is threading.main_thread():
    install_kick_handler()
