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


def install_kick_handler() -> None:
    """Install a handler for the kick signal unless the program has its own (only the
    main thread may do this). A thread that runs a vCPU keeps the kick blocked outside
    KVM_RUN and lets it in during KVM_RUN only (Vcpu.set_run_signals), taking it with
    sigtimedwait: the program's own handler never runs for a kick."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("minivmm must install its SIGUSR1 handler from the main thread: "
                               "import minivmm there first")
        signal.signal(KICK_SIGNAL, _no_op)

if threading.current_thread() is threading.main_thread():
    install_kick_handler()
