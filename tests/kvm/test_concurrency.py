"""Several Machines in one process: a kick reaches the vCPU thread it is for, and only
while that thread exists; a Machine running when the process forks."""
import os
import signal
import threading
import time

import pytest

from minivmm import machine as machine_module
from minivmm.machine import KICK_SIGNAL, Machine
from tests.conftest import in_child, payload


def test_no_kick_reaches_the_id_of_a_vcpu_thread_that_has_ended(monkeypatch):
    # stop() tested done, then kicked: a thread ending in between was signalled by an id
    # that a new thread (another Machine's) had taken, running the program's SIGUSR1
    # handler, or that pointed into an unmapped stack: pthread_kill crashed the process
    # (16 machines at once in threads, about one run in five)
    with Machine(payload("hello_long")) as m:
        m.start(timeout=20)
        st = m.states[0]
        thread = st.thread
        assert st.done.wait(20)
        thread.join()
        kills = []
        monkeypatch.setattr(machine_module.signal, "pthread_kill",
                            lambda ident, sig: kills.append(ident))
        m._kick(st, "stopped")           # what stop() does when done was read just before
        assert kills == []
        assert m.wait().vcpus[0].end.reason == "exit-port"


def test_vcpu_threads_start_with_every_signal_blocked(monkeypatch):
    # They inherited the mask of the thread calling start(): a kick before their own
    # block ran the program's SIGUSR1 handler in the main thread instead of stopping them
    from minivmm import _sys
    masks = []
    block = _sys.block_thread_signals

    def seen_then_block():
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, ()))
        block()
    monkeypatch.setattr(_sys, "block_thread_signals", seen_then_block)
    was = signal.pthread_sigmask(signal.SIG_UNBLOCK, (KICK_SIGNAL, signal.SIGINT))
    try:
        with Machine(payload("hello_long"), vcpus=2) as m:
            r = m.run(timeout=20)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, was)
    assert r.ok and len(masks) == 2
    for mask in masks:
        assert {KICK_SIGNAL, signal.SIGINT} <= mask


def test_many_machines_in_threads_with_their_own_timeouts():
    # each vCPU ends as its own Machine was asked, and no kick lands on the program's
    # SIGUSR1 handler
    hits, bad = [], []
    old = signal.signal(KICK_SIGNAL, lambda *a: hits.append(1))

    def one(i):
        try:
            with Machine(payload("spin" if i % 2 else "hello_long"),
                         vcpus=3 if i % 2 else 1) as m:
                r = m.run(timeout=0.05 + 0.01 * (i % 5) if i % 2 else 30)
            want = "timeout" if i % 2 else "exit-port"
            bad.extend((i, st.end.reason) for st in r.vcpus if st.end.reason != want)
        except Exception as e:
            bad.append((i, repr(e)))
    try:
        for _ in range(5):
            threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive()
    finally:
        signal.signal(KICK_SIGNAL, old)
    assert bad == [] and hits == []


def test_a_forked_child_can_close_but_not_wait_for_its_parents_running_machine():
    # The child has none of the vCPU threads: close() raised OSError EINVAL from
    # pthread_kill (their ids), and wait() without a timeout never returned
    with Machine(payload("spin"), vcpus=2) as m:
        m.start()
        time.sleep(0.1)

        def wait():
            m.wait()
            return "wait returned"

        def close():
            m.close()
            return "closed"
        said = in_child(wait)
        assert said.startswith("raised MachineError: this Machine was started in process"), said
        assert "did not come through the fork" in said
        assert in_child(close) == "closed"
        assert m.states[0].end is None      # the parent's vCPUs ran on meanwhile
        m.stop()
        assert [st.end.reason for st in m.states] == ["stopped", "stopped"]


_HANDLER_IN_KICK = """
import _thread, signal, faulthandler
from minivmm import machine as mm
from minivmm.machine import Machine
from tests.conftest import payload
faulthandler.dump_traceback_later(20, exit=True)
real = signal.pthread_kill
fired = []
def kill_then_signal(ident, sig):
    # a SIGALRM taken by another thread (the main one holds it back) while this one
    # kicks: its Python handler is due at the next check, inside the kick
    if not fired:
        fired.append(1)
        _thread.interrupt_main(signal.SIGALRM)
    real(ident, sig)
class PublicRLock:      # only the public API of a lock: no _is_owned()
    def __init__(self):
        self._lock = _thread.RLock()
    def acquire(self, *a):
        return self._lock.acquire(*a)
    def release(self):
        self._lock.release()
    __enter__ = acquire
    def __exit__(self, *exc):
        self.release()
with Machine(payload("spin")) as m:
    if {public_lock}:
        for st in m.states:
            st.kick_lock = PublicRLock()
    signal.signal(signal.SIGALRM, lambda *a: getattr(m, {call!r})({args}))
    m.start()
    mm.signal.pthread_kill = kill_then_signal
    m.stop()
    mm.signal.pthread_kill = real
    print(fired, [st.end.reason for st in m.states])
print("closed", m.vm is None)
"""


@pytest.mark.parametrize("public_lock", [False, True])
def test_a_signal_handler_stopping_the_machine_inside_a_kick_does_not_deadlock(public_lock):
    # Its stop() waited for the vCPU thread, whose end waited for the kick_lock that the
    # kick it interrupted held: a hang for ever (close() from the handler too).
    # public_lock: the kick-lock's owner was asked through RLock's private _is_owned()
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for call, args in (("stop", "'by-handler'"), ("close", "")):
        proc = subprocess.run([sys.executable, "-c", _HANDLER_IN_KICK.format(
                                  call=call, args=args, public_lock=public_lock)],
                              capture_output=True, text=True, timeout=60, cwd=root)
        # the kick's own reason, set before the handler ran; then a full close
        assert proc.stdout.split("\n")[:2] == ["[1] ['stopped']", "closed True"], \
            proc.stdout + proc.stderr[-2000:]


def test_a_child_forked_as_the_timeout_fires_can_close():
    # start(timeout)'s watchdog stopped the vCPUs through stop(), which takes the
    # Machine's lock: a fork() while it held it left the child's close() waiting for it
    # for ever (start(timeout=0) then fork(): 44 children in 100 hung)
    held = threading.Event()
    with Machine(payload("spin")) as m:
        real = m._lock

        class SlowLock:         # the watchdog, if it takes the lock, holds it a while
            def __enter__(self):
                real.acquire()
                if threading.current_thread().name == "vcpu-watchdog":
                    held.set()
                    time.sleep(1)

            def __exit__(self, *exc):
                real.release()
        m._lock = SlowLock()
        m.start(timeout=0)
        held.wait(1)            # fork while the watchdog holds it (if it ever does)

        def close():
            m.close()
            return "closed"
        assert in_child(close) == "closed"
        assert m.wait().vcpus[0].end.reason == "timeout"


def test_no_vcpu_runs_before_start_has_made_every_vcpu_thread(monkeypatch):
    # Each vCPU ran as soon as its thread existed: looping ones took the host's CPUs from
    # the threads still to be made, so start() grew with the square of the vCPUs (219
    # looping vCPUs on 2 CPUs: 30 s, with --timeout 3, whose watchdog came only after)
    made, seen = [], {}
    real_start = machine_module.start_thread

    def start_slowly(thread, what):
        real_start(thread, what)
        if thread.name[len("vcpu"):].isdigit():      # not the timeout's watchdog
            made.append(thread.name)
            time.sleep(0.05)            # room for a vCPU already running to exit
    monkeypatch.setattr(machine_module, "start_thread", start_slowly)
    with Machine(payload("multi_vcpu"), vcpus=3) as m:
        m.trace = lambda st, reason: seen.setdefault(st.index, len(made))
        r = m.run(timeout=20)
    assert r.ok
    assert seen == {0: 3, 1: 3, 2: 3}      # every first exit came after the last thread


def test_a_timeout_stops_many_looping_vcpus_in_time():
    # 192 looping vCPUs on a 2-CPU host: start() alone took 15-30 s before the fix
    t0 = time.monotonic()
    with Machine(payload("spin"), vcpus=192) as m:
        r = m.run(timeout=1)
    assert {st.end.reason for st in r.vcpus} == {"timeout"}
    assert time.monotonic() - t0 < 8, "the 1 s timeout took far longer to stop the vCPUs"


def test_the_timeout_watchdog_exists_before_any_vcpu_runs(monkeypatch):
    # Made after the vCPUs were let go, the watchdog had to get a CPU (and the GIL) from
    # every looping vCPU to start, and start() waited for it: `run spin --vcpus 1024
    # --timeout 3` ended after 5 to 75 s on 2 CPUs
    started = {}
    real_start = machine_module.start_thread

    def start(thread, what):
        real_start(thread, what)
        started[thread.name] = m._go.is_set()      # had the vCPUs been let go by then?
    monkeypatch.setattr(machine_module, "start_thread", start)
    with Machine(payload("spin"), vcpus=3) as m:
        r = m.run(timeout=0.5)
    assert {st.end.reason for st in r.vcpus} == {"timeout"}
    assert started == {"vcpu0": False, "vcpu1": False, "vcpu2": False,
                       "vcpu-watchdog": False}, started


def test_ctrl_c_while_start_makes_the_threads_stops_the_vcpus(monkeypatch):
    # The Ctrl-C held back while start() made the vCPU threads was raised as it ended:
    # run() never reached wait(), and the vCPUs it had made ran on (for ever, no timeout)
    real_start = machine_module.start_thread

    def start(thread, what):
        if thread.name == "vcpu0":
            os.kill(os.getpid(), signal.SIGINT)
        real_start(thread, what)
    monkeypatch.setattr(machine_module, "start_thread", start)
    m = Machine(payload("spin"), vcpus=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            m.run()
        ends = [st.end and st.end.reason for st in m.states]
        running = [t.name for t in threading.enumerate() if t.name.startswith("vcpu")]
    finally:
        m.close()
    assert ends == ["interrupted", "interrupted"] and running == []
