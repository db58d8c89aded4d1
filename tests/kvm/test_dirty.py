"""Dirty tracking on the real /dev/kvm: ring and bitmap, verified by both oracles."""
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minivmm import Kvm, KvmError, abi
from minivmm.dirty import tracker as trackermod
from minivmm.abicheck.checks_entries import NEXT_ITERATION
from minivmm.dirty.ring import DirtyRingError, enable_dirty_ring, overflow_reason
from minivmm.dirty.tracker import CollectionError, DirtySession, compare_runs
from minivmm.machine import MachineError
from minivmm.x86 import layout as L
from tests.conftest import ROOT, payload, run_cli
from tests.kvm.conftest import small_ring
from tests.unit.test_cli_errors import one_line_error


def session(name="dirty_seq", **kw):
    kw.setdefault("vcpus", 2)
    kw.setdefault("pages", 1024)
    kw.setdefault("iterations", 3)
    return DirtySession(payload(name), **kw)


def run(name="dirty_seq", **kw):
    with session(name, **kw) as s:
        recs = s.run(timeout=60)
        assert s.result.ok, [st.end.summary() for st in s.result.vcpus]
        return recs


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
@pytest.mark.parametrize("collect", ["sync", "async"])
def test_dirty_seq_reports_exactly_what_was_written(tracker, collect):
    recs = run(tracker=tracker, collect=collect)
    assert [r.iteration for r in recs] == [1, 2, 3]
    for r in recs:
        assert np.array_equal(r.data_pages, np.arange(1024)), r.iteration
        assert np.array_equal(r.changed, np.arange(1024))
        assert len(r.missed) == 0 and len(r.extra) == 0
        assert r.collection.reset_count_ok and r.ok
        c = r.collection
        assert c.entries >= 1024 and c.entries == sum(p.count for p in c.sets.values()) \
            + c.duplicates + len(c.bogus)
        if tracker == "bitmap":       # a bit per page: no duplicate, no ring's bookkeeping
            assert (c.duplicates, c.ring_full_exits, c.resets, c.reset_retries, c.lost) == \
                (0, 0, [], 0, [])


@pytest.mark.parametrize("name,kw", [("dirty_stride", {"stride": 7}),
                                     ("dirty_random", {"seed": 5, "writes": 100})])
def test_ring_and_bitmap_agree_and_match_the_plan(name, kw):
    ring = run(name, tracker="ring", **kw)
    bitmap = run(name, tracker="bitmap", **kw)
    assert compare_runs(ring, bitmap) == []
    for r in ring + bitmap:
        assert r.expected is not None and np.array_equal(r.data_pages, r.expected)
    if name == "dirty_stride":
        share = np.arange(0, 512, 7)
        assert np.array_equal(ring[0].data_pages, np.concatenate([share, share + 512]))


def test_the_ring_view_counts_what_each_collection_harvested_and_reset():
    with session(tracker="ring", vcpus=1, pages=64, iterations=2, show_ring=True) as s:
        recs = s.run(timeout=60)
    assert [r.iteration for r in recs] == [1, 2]
    for r in recs:
        v = trackermod.ring_view_dict(r.collection.ring_views[0])
        n = v["harvested"]
        assert n >= 64 and n == v["fetch_after"] - v["fetch_before"] == r.collection.entries
        assert v["before_harvest"]["dirty"] == v["after_harvest"]["reset"] == n
        assert v["reset_returned"] == n and v["after_reset"] == \
            {"dirty": 0, "reset": 0, "empty": 4096}
        assert r.collection.resets == [(n, n)]
        assert r.to_dict()["ring_view"] == {"0": v}


def test_each_vcpus_writes_land_in_its_own_ring():
    for r in run(tracker="ring", vcpus=4, pages=1024):
        for row in r.rows:
            assert row["in_own_ring"] == 256 and row["foreign"] == 0


def test_ring_full_exits_are_handled_without_losing_pages():
    recs = run(tracker="ring", vcpus=1, pages=8192, iterations=2, ring_entries=4096)
    assert sum(r.collection.ring_full_exits for r in recs) >= 2
    for r in recs:
        assert len(r.data_pages) == 8192 and len(r.missed) == 0 and not r.collection.lost


def test_many_ring_full_exits_in_a_row_are_each_counted_and_none_is_an_overflow():
    # Far more than EMPTY_FULL_LIMIT ring-full exits, each of which finds entries: none
    # counts towards an overflow, and each is counted once
    with session(tracker="ring", vcpus=1, pages=4096, iterations=2, ring_entries=512) as s:
        recs = s.run(timeout=60)
        exits = s.result.vcpus[0].exits_by_name()["dirty_ring_full"]
        assert s.result.ok, [st.end.summary() for st in s.result.vcpus]
    assert exits > 2 * trackermod.EMPTY_FULL_LIMIT
    assert sum(r.collection.ring_full_exits for r in recs) == exits
    assert all(r.ok and not r.collection.lost for r in recs)


def test_stages_are_sized_for_a_vcpus_share_and_do_not_grow():
    # Each stage has room, from the start, for what its vCPU dirties between two syncs
    # (its share of the pages and its page tables), so no collection pays for growing it.
    with session(tracker="ring", vcpus=2, pages=16384, iterations=2, ring_entries=4096) as s:
        before = [ring.stage.capacity for ring in s.tracker.rings.values()]
        recs = s.run(timeout=60)
        after = [ring.stage.capacity for ring in s.tracker.rings.values()]
    assert all(r.ok for r in recs) and sum(r.collection.ring_full_exits for r in recs) >= 2
    assert before == after and min(before) >= 8192 + 256
    # ... but at most 1 MiB each, however big the slot (a sparse run needs far less)
    with session(tracker="ring", vcpus=1, pages=1 << 20, iterations=1) as s:
        assert [ring.stage.capacity for ring in s.tracker.rings.values()] == [65536]


def test_system_slot_writes_are_reported_separately():
    r = run(tracker="bitmap")[0]
    system = r.collection.pages.get(L.SLOT_SYSTEM)
    assert system is not None and len(system)            # page-table A/D bits, at least
    assert np.all(system < L.system_slot_size(2) // 4096)


def test_iterate_pauses_the_guest_between_collections():
    with session(tracker="ring", iterations=4) as s:
        seen = []
        for rec in s.iterate(timeout=60):
            if rec.iteration == "final":
                break
            data = np.frombuffer(s.machine.data.map, dtype="<u8")[::512].copy()
            # paused at the barrier: every page holds this iteration, none the next
            assert np.all(data == rec.iteration)
            seen.append(rec.iteration)
        assert seen == [1, 2, 3, 4]


_EXTRA = ";! mode: long\n    mov rax, 0x80000000\n    mov qword ptr [rax], 1\n" \
         "    mov eax, 1\n    out 0xf0, eax\n    out 0xf4, al\n"


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_a_logged_slot_added_after_the_tracker_is_refused_not_left_untracked(tmp_path,
                                                                            tracker):
    # The bitmap dropped its pages without a word, the ring counted them as bogus
    src = tmp_path / "extra.asm"
    src.write_text(_EXTRA)
    log, refused = abi.KVM_MEM_LOG_DIRTY_PAGES, "slot 5 \\(extra\\) logs dirty pages"
    with DirtySession(str(src), tracker=tracker, pages=4, iterations=1) as s:
        s.machine.vm.add_memory(5, 2 << 30, 16 * 4096, log, "extra")
        with pytest.raises(ValueError, match=refused + ".*in the tracker's before_vcpus"):
            s.run(timeout=30)
    with session(tracker=tracker, vcpus=1, pages=4) as s:
        records = s.iterate(timeout=30)
        next(records)                   # added mid-run: refused before the vCPUs go on
        s.machine.vm.add_memory(5, 2 << 30, 16 * 4096, log, "extra")
        with pytest.raises(ValueError, match=refused):
            list(records)

    class Early(trackermod.make_tracker(tracker).__class__):   # as the error says
        def before_vcpus(self, machine):
            super().before_vcpus(machine)
            machine.vm.add_memory(5, 2 << 30, 16 * 4096, log, "extra")
    with DirtySession(str(src), tracker=Early(), pages=4, iterations=1) as s:
        first = s.run(timeout=30)[0]
    assert first.collection.pages[5].tolist() == [0] and not first.collection.bogus


@pytest.mark.parametrize("entries,word", [(3000, "not a power of two"),
                                          (64, "too small"), (1 << 20, "too large")])
def test_bad_ring_sizes_are_refused_before_the_kernel(entries, word):
    with pytest.raises(DirtyRingError, match=word):
        session(tracker="ring", ring_entries=entries)


def test_ring_after_vcpus_is_refused_clearly():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(DirtyRingError, match="before creating vCPUs"):
            enable_dirty_ring(vm, 4096)
        # and the kernel itself says EINVAL (abi.md rule 14), named with a hint
        with pytest.raises(KvmError) as info:
            vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096 * 16,
                          hints={22: "enable the dirty ring before creating vCPUs"})
        assert info.value.errno_name == "EINVAL" and "KVM_ENABLE_CAP" in str(info.value)


def test_a_ring_mapping_must_match_the_vms_ring():
    # A mapping larger than the kernel's ring would end the process with SIGBUS at the
    # first read past it; refused before mmap instead.
    from minivmm.dirty.ring import VcpuRing
    with Kvm() as kvm:
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            with pytest.raises(DirtyRingError, match="no dirty ring is enabled"):
                VcpuRing(vcpu, 4096)
        with kvm.create_vm() as vm:
            enable_dirty_ring(vm, 4096)
            vcpu = vm.create_vcpu(0)
            with pytest.raises(DirtyRingError, match="has 4096 entries, not 8192"):
                VcpuRing(vcpu, 8192)
            ring = VcpuRing(vcpu, 4096)
            assert len(ring.flags()) == 4096 and ring.harvest().count == 0
            with pytest.raises(DirtyRingError, match="already mapped"):
                VcpuRing(vcpu, 4096)
            assert vcpu.ring is ring


def test_a_session_runs_once_and_needs_a_vcpu():
    with session(tracker="bitmap", vcpus=1, pages=64, iterations=2) as s:
        assert all(r.ok for r in s.run(timeout=None))
        with pytest.raises(MachineError, match="already run"):
            s.run(timeout=None)         # used to wait forever for an end already counted
    # its Machine started by hand (or by iterate() in another thread meanwhile): the
    # refusal named the Machine, not the session the caller used
    with session(tracker="bitmap", vcpus=1, pages=64, iterations=2) as s:
        s.machine.start(timeout=10)
        with pytest.raises(MachineError, match="this DirtySession has already run"):
            s.run(timeout=None)
    with pytest.raises(MachineError, match="at least 1"):
        session(vcpus=0)
    s = session(vcpus=1, pages=64)
    s.close()
    with pytest.raises(MachineError, match="closed"):
        s.run()


def test_no_ring_capability_refuses_ring_and_auto_falls_back():
    with pytest.raises(DirtyRingError, match="no dirty ring"):
        session(tracker="ring", force_no_ring=True)
    env = {"MINIVMM_FORCE_NO_RING": "1"}
    line = one_line_error(run_cli("dirty", "--tracker", "ring", "--pages", "256", env=env))
    assert "no dirty ring" in line
    proc = run_cli("dirty", "--pages", "256", "--iterations", "2", "--json", env=env)
    assert proc.returncode == 0 and "using the bitmap only" in proc.stderr
    assert '"tracker": "bitmap"' in proc.stdout and '"tracker": "ring"' not in proc.stdout
    # ring options with no ring to apply to are refused, as --tracker bitmap refuses them
    # (an invalid --ring-entries 128 was taken without a word)
    for opts in (["--show-ring"], ["--ring-entries", "128"]):
        line = one_line_error(run_cli("dirty", "--pages", "256", *opts, env=env))
        assert "offers no dirty ring" in line and opts[0] in line


def test_the_plan_oracle_alone_catches_a_page_the_tracker_dropped():
    # Page 7 is dropped from every collection and the content oracle is made blind to it
    # (as to a write that left the first word as it was): the plan still expects it
    with session(tracker="ring", vcpus=2, pages=1024, iterations=2) as s:
        collect, compare = s.tracker.collect, s.oracle.compare

        def dropping():
            col = collect()
            pages = col.pages.get(L.SLOT_DATA)
            if pages is not None:         # the final collection finds none
                col.pages[L.SLOT_DATA] = pages[pages != 7]
            return col

        def blind(snap, reported):
            out = compare(snap, reported)
            out["missed"] = out["missed"][out["missed"] != 7]
            return out
        s.tracker.collect, s.oracle.compare = dropping, blind
        recs = s.run(timeout=60)
    assert [r.iteration for r in recs] == [1, 2]
    for r in recs:
        assert r.missed.tolist() == [7] and not r.ok
        assert [(row["reported"], row["expected"], row["missed"]) for row in r.rows] == \
            [(511, 512, 1), (512, 512, 0)]


def test_each_vcpu_row_counts_its_own_share(tmp_path):
    # 1000 pages for 3 vCPUs: 333 each, the last share reaching the slot's end
    with session(tracker="ring", vcpus=3, pages=1000, iterations=2) as s:
        recs = s.run(timeout=60)
        assert s.result.ok
    for r in recs:
        assert [(row["vcpu"], row["reported"], row["expected"], row["missed"], row["extra"],
                 row["in_own_ring"], row["foreign"]) for row in r.rows] == \
            [(i, 333, 333, 0, 0, 333, 0) for i in range(3)], r.iteration
    # a payload of the user's writing a page past each share: vCPU 0 and 1 write their
    # neighbour's first page, vCPU 2 the slot's last page, in no vCPU's share but its row's
    mine = tmp_path / "mine.asm"
    mine.write_text((ROOT / "guest_payloads" / "dirty_seq.asm").read_text()
                    .replace("    mov rcx, r13\n", "    mov rcx, r13\n    inc rcx\n"))
    with DirtySession(str(mine), tracker="ring", vcpus=3, pages=1000, iterations=1) as s:
        recs = s.run(timeout=60)
        assert s.result.ok
    assert np.array_equal(recs[0].data_pages, np.arange(1000))
    # (pages two vCPUs write land in either one's ring: in_own_ring is not compared)
    assert [(row["reported"], row["expected"], row["missed"], row["extra"])
            for row in recs[0].rows] == [(333, None, 0, 0), (333, None, 0, 0), (334, None, 0, 0)]


def test_reset_count_mismatch_is_reported(monkeypatch):
    with session(tracker="ring") as s:
        real = s.machine.vm.reset_dirty_rings
        monkeypatch.setattr(s.machine.vm, "reset_dirty_rings", lambda: real() + 1)
        recs = s.run(timeout=60)
    assert not recs[0].collection.reset_count_ok and not recs[0].ok
    got, want = recs[0].collection.resets[-1]
    assert got == want + 1


def test_reset_retries_are_counted_per_collection(monkeypatch):
    # The first reset is made to say one entry short (as a signal cuts one short): the
    # retry that finds nothing left is that collection's, not every later one's
    with session(tracker="ring", vcpus=1, iterations=2) as s:
        real, calls = s.machine.vm.reset_dirty_rings, []

        def short_once():
            calls.append(1)
            return real() - (len(calls) == 1)
        monkeypatch.setattr(s.machine.vm, "reset_dirty_rings", short_once)
        recs = s.run(timeout=60)
    assert [r.collection.reset_retries for r in recs[:2]] == [1, 0]
    assert recs[0].collection.lost and not recs[1].collection.lost and recs[1].ok


def test_overflowing_ring_is_detected_and_never_loops(monkeypatch):
    # Simulate a ring whose entries the VMM never finds (as after a kernel overflow):
    # every ring-full exit then harvests nothing.
    monkeypatch.setattr(trackermod, "dirty_count", lambda *args: 0)
    start = time.monotonic()
    with session(tracker="ring", vcpus=1, pages=8192, iterations=1) as s:
        recs = s.run(timeout=60)
        end = s.result.vcpus[0].end
    assert time.monotonic() - start < 30
    assert end.reason == "ring-overflow" and "overflowed" in end.detail["error"]
    assert any(r.collection.lost for r in recs)
    assert any(len(r.missed) for r in recs)          # the lost pages are reported as missed


@pytest.mark.parametrize("pattern,ends_at", [("EER" * 8, None), ("EEE", 3), ("REEE", 4)])
def test_only_enough_empty_ring_full_exits_in_a_row_are_an_overflow(monkeypatch, pattern,
                                                                     ends_at):
    # A ring-full exit whose harvest finds nothing (E) is forgiven until EMPTY_FULL_LIMIT
    # (3) of them come in a row; one that finds entries (R) starts the count again. The
    # empty ones are simulated: the vCPU's own harvest at its exit is skipped, so KVM,
    # finding the ring still full, exits again at once.
    real, exits = trackermod.RingTracker._harvest_locked, []

    def harvest(self, index, ring, full=False):
        if full:
            exits.append(index)
            if pattern[len(exits) - 1:len(exits)] == "E":
                return 0
        return real(self, index, ring, full)
    monkeypatch.setattr(trackermod.RingTracker, "_harvest_locked", harvest)
    with session(tracker="ring", vcpus=1, pages=8192, iterations=2) as s:
        recs = s.run(timeout=60)
        end = s.result.vcpus[0].end
    if ends_at is None:         # never three in a row: a run like any other
        assert len(exits) >= 6 and s.result.ok, (exits, end.summary())
        assert all(r.ok for r in recs)
        assert [len(r.data_pages) for r in recs if r.iteration != "final"] == [8192, 8192]
    else:
        assert end.reason == "ring-overflow" and len(exits) == ends_at, (exits, end.summary())
        assert recs[-1].collection.lost == [f"vCPU 0: {overflow_reason()}"]


def test_a_ring_full_exit_waits_for_a_collection_in_progress():
    # The handler tries the lock first; held by another thread (a collection, the
    # reaper), it waits for it rather than harvesting and resetting alongside, and the
    # wait is not timed as its collecting.
    with session(tracker="ring", vcpus=1, pages=8192, iterations=1) as s:
        handler, entered, released = s.machine.on_ring_full, threading.Event(), threading.Event()
        after_release = []

        def on_ring_full(st):
            entered.set()
            end = handler(st)
            after_release.append(released.is_set())
            return end
        s.machine.on_ring_full = on_ring_full

        def hold():
            entered.wait(30)
            time.sleep(0.3)
            released.set()
            s.tracker.lock.release()
        s.tracker.lock.acquire()
        holder = threading.Thread(target=hold)
        holder.start()
        recs = s.run(timeout=60)
        holder.join()
        assert s.result.ok, [st.end.summary() for st in s.result.vcpus]
    assert after_release and all(after_release), after_release
    assert recs[0].collection.ring_full_exits == len(after_release) and recs[0].ok
    # the 0.3 s it waited is the holder's time, not the handler's collecting
    assert 0 < recs[0].collection.background_s < 0.2, recs[0].collection.background_s


def test_a_harvest_of_a_full_lap_is_noted_and_its_holes_blamed_on_the_overrun(monkeypatch):
    # KVM stops a vCPU before its ring fills, so a full lap is simulated: the first
    # harvest with entries takes the whole ring. That lap is noted, and the entries of it
    # that were not DIRTY are put down to the overrun, not to out-of-order publishing
    real, taken = trackermod.dirty_count, []

    def one_full_lap(flags, entries, fetch, guess=0):
        n = real(flags, entries, fetch, guess)
        if n and not taken:
            taken.append(n)
            return entries
        return n
    monkeypatch.setattr(trackermod, "dirty_count", one_full_lap)
    with session(tracker="ring", vcpus=1, pages=64, iterations=2, ring_entries=256) as s:
        recs = s.run(timeout=60)
    lost = recs[0].collection.lost
    assert taken and taken[0] < 256 and not recs[0].ok
    assert lost[0] == ("vCPU 0: a harvest took a full lap of 256 entries: the ring was full, "
                       "so later dirty pages may have overwritten entries"), lost
    assert any(n.startswith("vCPU 0: ") and "were not DIRTY when copied: KVM wrote over them "
               "when the ring was overrun" in n for n in lost[1:]), lost


@pytest.mark.parametrize("collect", ["sync", "async"])
def test_a_failing_collection_is_raised_not_waited_for(monkeypatch, collect):
    # A bug in a collection runs in a vCPU (or reaper) thread: the session must stop
    # the machine and raise it in the caller's thread, not wait for its timeout.
    def broken(self):
        raise RuntimeError("collector bug")
    with session(tracker="ring", collect=collect, iterations=50) as s:
        monkeypatch.setattr(type(s.tracker), "collect", broken)
        monkeypatch.setattr(type(s.tracker), "poll", broken)
        start = time.monotonic()
        with pytest.raises(CollectionError, match="RuntimeError: collector bug") as info:
            s.run(timeout=60)
        assert time.monotonic() - start < 20
        assert "in broken" in info.value.thread_traceback
        assert all(st.done.is_set() for st in s.machine.states)


def test_a_kvm_error_in_a_collection_stays_a_kvm_error(monkeypatch):
    with session(tracker="ring", iterations=20) as s:
        def failing():
            raise KvmError("KVM_RESET_DIRTY_RINGS", 22, "the dirty ring is not enabled")
        monkeypatch.setattr(s.machine.vm, "reset_dirty_rings", failing)
        with pytest.raises(KvmError, match="KVM_RESET_DIRTY_RINGS failed: EINVAL") as info:
            s.run(timeout=60)
        assert info.value.errno == 22 and "failing" in info.value.thread_traceback


def test_cli_dirty_both_json():
    import json
    proc = run_cli("dirty", "--tracker", "both", "--vcpus", "2", "--pages", "1024",
                   "--iterations", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["agree"] and [r["tracker"] for r in out["runs"]] == ["ring", "bitmap"]
    it = out["runs"][0]["iterations"][0]
    assert it["iteration"] == 1 and it["pages"]["data"] == list(range(1024))
    assert it["missed"] == 0 and it["reset_count_ok"] is True


def test_cli_dirty_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the [plot] extra (make test has it)")
    png = tmp_path / "d.png"
    proc = run_cli("dirty", "--payload", "dirty_random", "--pages", "512", "--iterations", "2",
                   "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: OK - ring and bitmap agree" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,word", [(["--ring-entries", "3000"], "not a power of two"),
                                       # the host's range, named as the option: it said
                                       # only "ring size 64 is too small"
                                       (["--ring-entries", "64"],
                                        "minivmm: --ring-entries: ring size 64 is too small"),
                                       (["--ring-entries", str(1 << 20)],
                                        "minivmm: --ring-entries: ring size 1048576 is too large"),
                                       (["--iterations", "0"], "between 1 and 4294967295"),
                                       (["--iterations", str(2 ** 64)], "between 1 and"),
                                       (["--payload", "dirty_stride", "--stride", "0"],
                                        "--stride must be between 1"),
                                       (["--payload", "dirty_random", "--writes", "-5"],
                                        "--writes must be between 0"),
                                       (["--payload", "dirty_random", "--seed", str(2 ** 64)],
                                        "--seed must be between 0"),
                                       # more vCPUs than pages, and than KVM allows: the
                                       # vCPUs are named, not the pages
                                       (["--vcpus", "100000"], "--vcpus must be between 1 and"),
                                       (["--vcpus", "4", "--pages", "3"], "at least one page"),
                                       (["--no-manual-protect"], "bitmap options"),
                                       (["--timeout", "nan"], "not a finite number"),
                                       (["--plot", "/nonexistent/d.png"], "cannot write"),
                                       (["--plot", "/proc/d.png"], "cannot write /proc/d.png"),
                                       (["--plot", "/tmp"], "give a FILE.png")])
def test_cli_dirty_bad_input(args, word):
    if "--plot" in args:        # without matplotlib --plot is refused for that first
        pytest.importorskip("matplotlib", reason="--plot needs the [plot] extra")
    # each of these used to run (and hang, or report false misses, or fail after the run)
    assert word in one_line_error(run_cli("dirty", "--tracker", "ring", "--pages", "256", *args))


@pytest.mark.parametrize("option", [["--show-ring"], ["--ring-entries", "512"]])
def test_ring_options_are_refused_with_the_bitmap_alone(option):
    line = one_line_error(run_cli("dirty", "--tracker", "bitmap", "--pages", "64", *option))
    assert "ring options" in line


def test_the_rings_picture_path_is_checked_before_the_run(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the [plot] extra")
    (tmp_path / "d-rings.png").mkdir()
    line = one_line_error(run_cli("dirty", "--pages", "64", "--iterations", "1", "--show-ring",
                                  "--plot", tmp_path / "d.png"))
    assert "cannot write" in line and "d-rings.png" in line and "Is a directory" in line
    assert not (tmp_path / "d.png").exists()      # the check leaves nothing behind


def test_initially_set_needs_manual_protect():
    with pytest.raises(ValueError, match="INITIALLY_SET is an option of manual protect"):
        session(tracker=trackermod.BitmapTracker(manual_protect=False, initially_set=True))


@pytest.mark.parametrize("offered", [0, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE])
def test_initially_set_is_refused_where_the_kernel_lacks_it(monkeypatch, capsys, offered):
    # a kernel without INITIALLY_SET (or without manual protect at all): the option used
    # to be dropped without a word, the first collection then not what was asked
    real = Kvm.check_extension
    monkeypatch.setattr(Kvm, "check_extension", lambda self, cap: offered
                        if cap == abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 else real(self, cap))
    with pytest.raises(ValueError, match="does not offer KVM_DIRTY_LOG_INITIALLY_SET"):
        session(tracker=trackermod.BitmapTracker(initially_set=True))
    from minivmm import cli
    assert cli.main(["dirty", "--tracker", "bitmap", "--initially-set", "--pages", "64",
                     "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --initially-set" in err
    # with --tracker both, refused before the ring's run, not after it
    monkeypatch.setattr(cli, "_run_dirty_session", lambda *a: pytest.fail("a run was made"))
    assert cli.main(["dirty", "--tracker", "both", "--initially-set", "--pages", "64",
                     "--iterations", "1"]) == 2
    assert "drop --initially-set" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(Kvm, "check_extension", lambda self, cap: offered
                        if cap == abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 else real(self, cap))
    # without the option the bitmap falls back to GET-and-clear (--json: manual_protect)
    tracker = trackermod.BitmapTracker()
    recs = run(tracker=tracker, pages=64, iterations=2)
    assert all(r.ok for r in recs) and tracker.manual == bool(offered)


def test_timeout_stops_a_guest_that_keeps_syncing():
    # The deadline used to be checked only when no collection came for 0.1 s
    start = time.monotonic()
    proc = run_cli("dirty", "--tracker", "ring", "--pages", "256", "--iterations", "100000000",
                   "--timeout", "1", "--json", timeout=60)
    took = time.monotonic() - start
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and not data["ok"] and took < 20
    ends = data["runs"][0]["vcpu_ends"]
    assert [e["reason"] for e in ends] == ["timeout", "timeout"]
    assert "stopped by --timeout" in proc.stderr
    # a vCPU stopped before a sync has not written its plan: no miss is made up for it
    assert all(it["missed"] == 0 for it in data["runs"][0]["iterations"])


ONE_SYNC = """;! mode: long
;! vcpus: 2
    mov qword ptr [rsi], 1
    test edi, edi
    jnz spin
    mov eax, 1
    out 0xf0, eax
spin:
    pause
    jmp spin
"""


@pytest.mark.parametrize("collect", ["sync", "async"])
def test_a_collection_made_as_the_timeout_stops_the_vcpus_is_kept(tmp_path, collect):
    # vCPU 0 syncs once and spins, vCPU 1 never syncs: the barrier completes only when the
    # timeout ends vCPU 1, and that collection used to be dropped and its pages "missed"
    src = tmp_path / "onesync.asm"
    src.write_text(ONE_SYNC)
    proc = run_cli("dirty", "--payload", src, "--tracker", "both", "--pages", "64",
                   "--timeout", "0.5", "--collect", collect, "--json", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    for run in data["runs"]:
        its = {it["iteration"]: it for it in run["iterations"]}
        assert 1 in its and its[1]["pages"]["data"] == [0, 32], run["tracker"]
        assert all(it["missed"] == 0 for it in its.values()), run["tracker"]
        # vCPU 1 never reached the sync: no plan is held against it
        assert [v["expected"] for v in its[1]["vcpus"]] == [None, None]
        assert its[1]["complete"] is False
    assert data["agree"] and "stopped by --timeout" in proc.stderr


def test_runs_stopped_by_a_timeout_are_compared_where_both_completed():
    proc = run_cli("dirty", "--tracker", "both", "--pages", "256", "--iterations",
                   str(2 ** 32 - 1), "--timeout", "0.3", "--json", timeout=60)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and not data["ok"]
    assert data["agree"] and data["differences"] == [] and "compared" in data
    assert "disagree" not in proc.stderr


def test_a_nonzero_exit_code_is_named_in_the_verdict():
    from minivmm.dirty import report
    end = {"reason": "exit-port", "code": 5, "vector": None}
    summary = {"runs": [{"tracker": "ring", "iterations": [], "vcpus_ok": False,
                         "vcpu_ends": [{"reason": "exit-port", "code": 0}, end]}]}
    assert report.verdict(summary) == "verdict: FAIL - ring: vCPU 1 ended badly (exited with code 5)"
    # which vCPU, and how many more: only the first bad end was told, as "a vCPU"
    summary["runs"][0]["vcpu_ends"] = [{"reason": "timeout"}, {"reason": "timeout"}, end]
    # the guest's own failure is named, not a vCPU the timeout stopped while it waited
    assert report.verdict(summary) == ("verdict: FAIL - ring: vCPU 2 ended badly (exited with "
                                       "code 5; 2 more vCPU(s) too)")
    # only host stops: the first of them
    summary["runs"][0]["vcpu_ends"] = [{"reason": "exit-port", "code": 0},
                                       {"reason": "timeout"}, {"reason": "interrupted"}]
    assert report.verdict(summary) == ("verdict: FAIL - ring: vCPU 1 ended badly (stopped by "
                                       "--timeout; 1 more vCPU(s) too)")


def test_ctrl_c_during_dirty_run():
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "dirty", "--iterations", "1000000",
                             "--pages", "2048"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


@pytest.mark.parametrize("verify", [True, False])
def test_ring_full_on_several_vcpus_is_not_mistaken_for_overflow(verify):
    # A vCPU's ring may already have been emptied by another vCPU's ring-full handler
    # when its own handler runs: finding nothing then is not an overflow.
    for _ in range(3):
        with session(tracker="ring", vcpus=2, pages=4096, iterations=3,
                     ring_entries=small_ring(), verify=verify) as s:
            recs = s.run(timeout=60)
            assert s.result.ok, [st.end.summary() for st in s.result.vcpus]
        assert all(not r.collection.lost for r in recs)
        assert [len(r.data_pages) for r in recs if r.iteration != "final"] == [4096] * 3


def test_signals_during_resets_lose_no_page():
    # A pending signal stops KVM_RESET_DIRTY_RINGS part-way (a partial count, not EINTR);
    # the entries left un-reset, and since v6.17 the batch the kernel was coalescing (up
    # to 64 pages, counted as reset), keep their pages write-enabled: iteration 2's writes
    # to them made no entry. Signals are now held back during every reset.
    from minivmm.machine import KICK_SIGNAL
    retried = 0
    for _ in range(4):
        s = DirtySession(payload("dirty_seq"), tracker="ring", vcpus=1, pages=32768,
                         iterations=2, ring_entries=65536)
        collect = s.machine.on_sync

        def on_sync(st, tag, collect=collect):
            if tag != 1:
                return collect(st, tag)
            me, stop = threading.get_ident(), threading.Event()

            def storm():
                while not stop.is_set():
                    signal.pthread_kill(me, KICK_SIGNAL)
            t = threading.Thread(target=storm)
            t.start()
            try:
                return collect(st, tag)
            finally:
                stop.set()
                t.join()
        s.machine.on_sync = on_sync
        with s:
            recs = s.run(timeout=60)
        for r in recs:
            assert r.ok and len(r.missed) == 0 and not r.collection.lost, \
                (r.iteration, r.collection.resets, len(r.missed), r.collection.lost)
        retried += sum(r.collection.reset_retries for r in recs)
    assert retried == 0         # with signals held back no reset stops part-way


def test_reset_holds_signals_back_only_while_it_runs():
    from minivmm import _sys
    seen = []

    def tracer(fd, request, arg, name, hints, run=None):
        seen.append((name, signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        return 0
    with Kvm() as kvm, kvm.create_vm() as vm:
        enable_dirty_ring(vm, small_ring())
        _sys.tracer = tracer
        try:
            vm.reset_dirty_rings()
            vm.reset_dirty_rings(hold_signals=False)
        finally:
            _sys.tracer = None
    (name, held), (_, free) = seen
    assert name == "KVM_RESET_DIRTY_RINGS"
    assert {signal.SIGUSR1, signal.SIGINT, signal.SIGALRM, signal.SIGTERM} <= held
    assert signal.SIGUSR1 not in free
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_closing_a_session_inside_its_iterate_loop_says_so(tracker):
    s = session(tracker=tracker, iterations=5)
    with pytest.raises(MachineError, match="this DirtySession is closed"):
        for rec in s.iterate(timeout=30):
            if rec.iteration == 2:
                s.close()
    s.close()                                   # a second close is harmless


def test_closing_a_session_from_another_thread_says_so():
    s = session(iterations=100000, pages=256)
    timer = threading.Timer(0.3, s.close)
    timer.start()
    try:
        with pytest.raises(MachineError, match="closed"):
            for _ in s.iterate(timeout=30, gated=False):
                pass
    finally:
        timer.join()
        s.close()


@pytest.mark.parametrize("args", [["--payload", "dirty_stride", "--pages", "64"],
                                  ["--vcpus", "8", "--pages", "9"]])
def test_initially_set_with_both_trackers_leaves_iteration_1_out_of_the_comparison(args):
    # The bitmap's first GET reports every page (api.rst 7.18); the ring only what was
    # written: that is not a disagreement
    proc = run_cli("dirty", "--initially-set", "--tracker", "both", "--iterations", "3",
                   "--json", *args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["agree"] and out["ok"] and "not iteration 1" in out["compared"]
    ring, bitmap = out["runs"]
    assert bitmap["initially_set"] and not ring["initially_set"]
    first = bitmap["iterations"][0]
    assert first["iteration"] == 1 and first["reported"] == int(args[-1])   # every page
    # only iteration 1 is left out: a difference in iteration 2 is still found
    from types import SimpleNamespace as R
    a = [R(iteration=i, data_pages=np.arange(4), complete=True) for i in (1, 2)]
    b = [R(iteration=1, data_pages=np.arange(9), complete=True),
         R(iteration=2, data_pages=np.arange(3), complete=True)]
    assert [d["iteration"] for d in compare_runs(a, b, skip=(1,))] == [2]


def test_initially_set_leaves_out_the_final_collection_of_a_payload_that_never_syncs():
    proc = run_cli("dirty", "--initially-set", "--tracker", "both", "--pages", "64",
                   "--payload", "hello_long", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["agree"] and "not the final collection" in out["compared"]


def test_single_tracker_verdict_reads_and_names_only_the_oracles_used(tmp_path):
    proc = run_cli("dirty", "--tracker", "ring", "--pages", "64", "--iterations", "2")
    assert "verdict: OK - ring: no page missed" in proc.stdout
    assert "content and plan oracles" in proc.stdout
    src = (ROOT / "guest_payloads" / "dirty_seq.asm").read_text()
    own = tmp_path / "mine.asm"
    own.write_text(src)                      # not a shipped payload: no plan to check against
    proc = run_cli("dirty", "--payload", str(own), "--tracker", "ring", "--pages", "64",
                   "--iterations", "2")
    assert proc.returncode == 0, proc.stderr
    assert "checked against the content oracle)" in proc.stdout


def test_a_close_racing_the_final_collection_says_closed():
    # another thread's close() landing just before the final collection reads the rings
    s = session(tracker="ring", iterations=2)
    collect = s.tracker.collect

    def closed_meanwhile():
        if all(st.done.is_set() for st in s.machine.states):   # the final collection
            s.close()
        return collect()
    s.tracker.collect = closed_meanwhile
    with pytest.raises(MachineError, match="this DirtySession is closed"):
        s.run(timeout=30)


def test_a_close_from_inside_a_collection_on_a_vcpu_thread_does_not_hang():
    # The closing vCPU thread holds the barrier the other vCPUs wait at: waiting for them
    # deadlocked (the run never ended, whatever its timeout)
    with session(tracker="ring", iterations=3) as s:
        collect = s.tracker.collect

        def close_then_collect():
            s.close()
            return collect()
        s.tracker.collect = close_then_collect
        t0 = time.monotonic()
        with pytest.raises(MachineError, match="this DirtySession is closed"):
            s.run(timeout=30)
        assert time.monotonic() - t0 < 10


def test_vcpu_threads_reset_with_signals_blocked_and_take_their_kicks():
    # A vCPU thread blocks every signal outside KVM_RUN (KVM_SET_SIGNAL_MASK lets the kick
    # in during KVM_RUN), so its ring-full resets cannot be cut short, at no cost per reset
    from minivmm.machine import KICK_SIGNAL
    masks = []
    with session(tracker="ring", vcpus=1, pages=8192, iterations=2, ring_entries=4096) as s:
        vm = s.machine.vm
        reset = vm.reset_dirty_rings

        def recording_reset(*a, **k):
            masks.append((threading.current_thread() is threading.main_thread(),
                          signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            return reset(*a, **k)
        vm.reset_dirty_rings = recording_reset
        recs = s.run(timeout=60)
        assert s.result.ok and all(r.ok for r in recs)
        assert sum(r.collection.ring_full_exits for r in recs) >= 2
    in_vcpus = [m for main, m in masks if not main]
    assert in_vcpus and all({KICK_SIGNAL, signal.SIGINT, signal.SIGALRM} <= m for m in in_vcpus)
    assert KICK_SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, [])   # main: untouched


def test_stray_kicks_neither_end_a_run_nor_make_it_spin():
    # A kick that lands while the vCPU thread is outside KVM_RUN stays pending (blocked):
    # the next KVM_RUN returns EINTR once and the thread takes the signal, then runs on
    from minivmm.machine import KICK_SIGNAL
    m = trackermod.Machine(payload("dirty_seq"), vcpus=1, pages=64, regs={"rcx": 20000})
    with m:
        m.start(30)
        for _ in range(50):
            st = m.states[0]
            if st.thread is not None and not st.done.is_set():
                signal.pthread_kill(st.thread.ident, KICK_SIGNAL)
            time.sleep(0.002)
        r = m.wait()
    st, = r.vcpus
    assert st.end.reason == "exit-port" and st.end.code == 0, st.end.summary()
    assert st.exits_by_name().get("intr", 0) <= 50


def test_a_payload_named_like_a_shipped_one_gets_no_plan(tmp_path):
    # The plan oracle replays the shipped payloads; a user's dirty_seq.asm writing every
    # other page was held to the shipped plan and "missed" the pages it never wrote.
    mine = tmp_path / "dirty_seq.asm"
    mine.write_text((ROOT / "guest_payloads" / "dirty_seq.asm").read_text()
                    .replace("add rdi, 4096", "add rdi, 8192")
                    .replace("    mov rcx, r13\n", "    mov rcx, r13\n    shr rcx, 1\n"))
    with DirtySession(str(mine), tracker="ring", vcpus=1, pages=64, iterations=2) as s:
        recs = s.run(timeout=60)
    assert s.result.ok
    for r in recs:
        assert r.expected is None and r.ok, (r.iteration, r.missed)
        assert np.array_equal(r.data_pages, np.arange(0, 64, 2))


def test_the_ring_size_is_taken_as_the_u32_kvm_reads():
    # KVM truncates args[0] to u32 (abi.md rule 12): 2**32 | 65536 makes a 65536-byte ring
    from minivmm.dirty.ring import VcpuRing
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, (1 << 32) | 65536)
        assert vm.dirty_ring_bytes == 65536
        ring = VcpuRing(vm.create_vcpu(0), 4096)
        assert len(ring.flags()) == 4096


def test_a_tracker_serves_one_session_and_the_poll_interval_is_checked():
    tracker = trackermod.RingTracker(small_ring())
    with DirtySession(payload("dirty_seq"), tracker=tracker, vcpus=2, pages=8,
                      iterations=1) as s:
        s.run(timeout=30)
    # its rings are the closed VM's: a CollectionError about a released memoryview before
    with pytest.raises(ValueError, match="served another DirtySession"):
        DirtySession(payload("dirty_seq"), tracker=tracker, vcpus=1, pages=8)
    for bad, error in (("0.01", TypeError), (None, TypeError), (0, ValueError),
                       (float("nan"), ValueError)):   # killed or stalled the reaper thread
        with pytest.raises(error, match="poll_interval_s"):
            DirtySession(payload("dirty_seq"), vcpus=1, pages=8, collect="async",
                         poll_interval_s=bad)


RDTSC_TWO_SYNCS = """\
;! mode: long
;! description: writes one page picked by rdtsc, then syncs twice with the same tag
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, 1
iteration:
    rdtsc
    xor edx, edx
    div r13
    shl rdx, 12
    mov qword ptr [r12 + rdx], r15
    mov eax, r15d
    out 0xf0, eax
""" + NEXT_ITERATION            # the second sync, with the same tag, ends the iteration


def test_both_trackers_compare_every_collection_and_say_when_the_guests_differ(tmp_path):
    # Each VM's guest picks its pages by rdtsc, so the runs differ in the first collection
    # of every tag and agree in the second; the comparison saw only the second and said
    # OK. And the disagreement is the guests' (their content differs too): the verdict
    # says so rather than blaming a tracker
    src = tmp_path / "rdtsc2.asm"
    src.write_text(RDTSC_TWO_SYNCS)
    proc = run_cli("dirty", "--payload", src, "--tracker", "both", "--vcpus", "1",
                   "--pages", "4096", "--iterations", "3", "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and not out["agree"] and not out["ok"], proc.stderr
    for run in out["runs"]:        # each tracker reported exactly what its guest wrote
        assert run["ok"] and [it["reported"] for it in run["iterations"]] == [1, 0] * 3
    assert out["differences"] and all(d["guests_differ"] and "repeat" not in d
                                      for d in out["differences"])
    assert "the guests themselves changed different pages" in proc.stderr


def test_the_ring_view_names_each_collection_of_a_tag_synced_twice(tmp_path):
    src = tmp_path / "rdtsc2.asm"
    src.write_text(RDTSC_TWO_SYNCS)
    proc = run_cli("dirty", "--payload", src, "--tracker", "ring", "--vcpus", "1",
                   "--pages", "64", "--iterations", "2", "--show-ring")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("iteration ")] == \
        ["iteration 1:", "iteration 1#2:", "iteration 2:", "iteration 2#2:"]
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:]
            if line.split()[1:2] == ["ring"]]
    assert rows == ["1", "1#2", "2", "2#2"]                 # the table's too


def test_the_rings_picture_names_each_collection_of_a_tag_synced_twice(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from minivmm.dirty import report
    src = tmp_path / "rdtsc2.asm"
    src.write_text(RDTSC_TWO_SYNCS)
    labels, real = [], Axes.set_yticks
    monkeypatch.setattr(Axes, "set_yticks",
                        lambda self, t, lab=None, **kw: labels.extend(lab) or real(self, t, lab,
                                                                                   **kw))
    with DirtySession(str(src), tracker="ring", vcpus=1, pages=64, iterations=1,
                      show_ring=True) as s:
        report.plot_rings(s.run(timeout=30), str(tmp_path / "r.png"))
    assert [lab.rsplit(" ", 1)[0] for lab in labels[::3]] == ["it 1 vCPU 0", "it 1#2 vCPU 0"]


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_a_guest_that_never_stops_syncing_is_stopped(tracker):
    # it piled up a record per sync until the timeout: 30,000 records, 250 MB in 20 s
    from minivmm.payload import assemble_source
    src = ";! mode: long\n    mov eax, 1\nagain:\n    mov qword ptr [rsi], rax\n" \
          "    out 0xf0, eax\n    jmp again\n"
    t0 = time.monotonic()
    with DirtySession(assemble_source(src, "syncs.asm"), tracker=tracker, vcpus=2, pages=64,
                      iterations=1, ring_entries=small_ring()) as s:
        records = s.run(timeout=5)
    assert time.monotonic() - t0 < 4
    limit = trackermod.SYNCS_PER_ITERATION + trackermod.EXTRA_SYNCS
    assert limit < len(records) <= limit + 2, len(records)   # the cap, and the final one
    for st in s.result.vcpus:
        assert st.end.reason == "too-many-syncs", st.end.summary()
        # the limit it passed, not a count that was already out of date when printed
        assert f"more than {limit} collections for 1 iteration(s) asked" in st.end.summary()


def test_a_guest_that_syncs_up_to_the_limit_is_not_stopped():
    # "more than 4 collections per iteration asked, plus 64" (README): the limit itself is
    # allowed (a guest with exactly that many syncs was ended too-many-syncs)
    from minivmm.payload import assemble_source
    limit = trackermod.SYNCS_PER_ITERATION + trackermod.EXTRA_SYNCS
    src = f";! mode: long\n    mov ecx, {limit}\nagain:\n    mov eax, 1\n" \
          "    out 0xf0, eax\n    dec ecx\n    jnz again\n    xor eax, eax\n    out 0xf4, al\n"
    with DirtySession(assemble_source(src, "syncs.asm"), tracker="ring", vcpus=1, pages=16,
                      iterations=1) as s:
        records = s.run(timeout=30)
    assert len(records) >= limit
    assert [st.end.reason for st in s.result.vcpus] == ["exit-port"]


@pytest.mark.parametrize("collect", ["sync", "async"])
def test_a_vcpu_stopped_at_the_barrier_does_not_complete_it_for_one_still_running(collect):
    # vCPU 0 waits at the sync of iteration 1 and is stopped there; it ended while still
    # counted as arrived, so the barrier completed without vCPU 1, which was still on its
    # way: vCPU 1's own collection of iteration 1 then found nothing, and the plan oracle
    # reported every page it had written as missed (a stop() at a random time did it)
    s = session(tracker="ring", iterations=2, collect=collect)
    sync = s.machine.on_sync

    def on_sync(st, tag):
        if st.index == 1 and tag == 1:
            deadline = time.monotonic() + 10
            while 0 not in s._arrived and time.monotonic() < deadline:
                time.sleep(0.001)
            s.machine._kick(s.machine.states[0], "stopped")
            s.machine.states[0].done.wait(10)
        sync(st, tag)
    s.machine.on_sync = on_sync
    with s:
        recs = s.run(timeout=30)
    assert [st.end.reason for st in s.result.vcpus] == ["stopped", "exit-port"]
    first = [r for r in recs if r.iteration == 1]
    assert len(first) == 1 and first[0].complete
    assert all(r.ok for r in recs), [(r.iteration, len(r.missed)) for r in recs]


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_a_vcpu_whose_kick_is_not_yet_sent_waits_at_the_barrier(monkeypatch, tracker):
    # --timeout 0.000001 with 8 vCPUs: the watchdog set stop_reason, then waited for the
    # GIL before it set immediate_exit and sent the signal. vCPU 0, waiting at the sync of
    # iteration 1, took stop_reason for being stopped and left the barrier, but ran on:
    # it wrote iteration 2 before vCPU 1 completed the barrier of 1 (so collection 1 took
    # those pages), then arrived at 2 as the kick landed. Collection 2 planned vCPU 0's
    # pages, which were in collection 1: "ring missed 512 page(s)" that the guest wrote
    from minivmm import _sys
    s = session(tracker=tracker, iterations=4)
    st0 = s.machine.states[0]
    sync, real_held = s.machine.on_sync, _sys.signals_held
    release, at2, collected1 = threading.Event(), threading.Event(), threading.Event()
    kicking = threading.Event()

    def held():                         # the kicker stalls inside the kick, before its lock
        if threading.current_thread().name == "late-kicker":
            release.wait(10)
        return real_held()
    monkeypatch.setattr(_sys, "signals_held", held)
    kicker = threading.Thread(target=s.machine._kick, args=(st0, "timeout"),
                              name="late-kicker", daemon=True)

    def on_sync(st, tag):
        if st.index == 0 and tag == 1:
            kicker.start()
            time.sleep(0.05)            # the kick has begun, and stalled
            kicking.set()
        elif st.index == 0 and tag == 2:  # it ran on: let the kick land after collection 1
            at2.set()
            collected1.wait(10)
            release.set()
            kicker.join(10)
        elif st.index == 1 and tag == 1:
            kicking.wait(10)
            at2.wait(1)                 # vCPU 0 writes iteration 2 meanwhile, if let go
            release.set()
            kicker.join(10)
            sync(st, tag)
            collected1.set()
            return
        sync(st, tag)
    s.machine.on_sync = on_sync
    with s:
        recs = s.run(timeout=30)
    assert all(r.ok for r in recs), [(r.iteration, len(r.missed)) for r in recs]
    assert not at2.is_set(), "vCPU 0 ran past the sync it was stopped at"
    assert [st.end.reason for st in s.result.vcpus] == ["timeout", "exit-port"]
    assert [r.iteration for r in recs] == [1, 2, 3, 4]
    assert recs[0].complete and recs[0].rows[0]["expected"] == recs[0].rows[0]["reported"]


def test_close_waits_for_the_reapers_poll_in_flight():
    # close() released the VM while the reaper could still be inside a poll, which then
    # failed with EBADF where nothing read it (seen once in ~70 stress runs)
    entered, polls = threading.Event(), []
    with DirtySession("dirty_seq", tracker="ring", vcpus=1, pages=64, iterations=3,
                      collect="async", poll_interval_s=0.001) as s:
        real = s.tracker.poll

        def slow_poll():
            entered.set()
            time.sleep(0.3)             # a poll still in flight when close() comes
            real()
            polls.append(threading.current_thread().name)
        s.tracker.poll = slow_poll
        it = s.iterate(timeout=30)
        next(it)
        assert entered.wait(5)
        s.close()
        assert not s._reaper.is_alive()
        assert polls == ["reaper"]      # it finished against an open VM
        assert s._failure is None


def test_a_reaper_failure_after_the_last_vcpu_ended_is_raised(monkeypatch):
    # The last vCPU's end queues None; a reaper failing after it (it polls until iterate()
    # has waited for the machine) queued its error behind that None, where the loop never
    # looked: the run reported OK with a failed KVM_GET_DIRTY_LOG
    import ctypes
    import errno
    from minivmm import _sys
    s = session(tracker="bitmap", pages=256, iterations=2, collect="async")
    failed = threading.Event()

    def tracer(fd, request, arg, name, hints, run=None):
        if name == "KVM_GET_DIRTY_LOG" and threading.current_thread().name == "reaper" \
                and all(st.done.is_set() for st in s.machine.states):
            failed.set()
            raise _sys.failure(fd, name, errno.EFAULT, hints)
        ret = _sys._ioctl(fd, request, arg)
        if ret < 0:
            raise _sys.failure(fd, name, ctypes.get_errno(), hints)
        return ret
    wait = s.machine.wait

    def slow_wait():          # the consumer is slower than the reaper's next poll
        failed.wait(5)
        return wait()
    monkeypatch.setattr(s.machine, "wait", slow_wait)
    monkeypatch.setattr(_sys, "tracer", tracer)
    with s, pytest.raises(KvmError) as info:
        s.run(timeout=30)
    assert failed.is_set()
    assert (info.value.call, info.value.errno) == ("KVM_GET_DIRTY_LOG", errno.EFAULT)


def test_a_ten_digit_tag_widens_the_tables_first_column(tmp_path):
    # `iter` was 5 wide: a tag of 4294967295 pushed its row's columns out of line
    src = tmp_path / "bigtag.asm"
    src.write_text(";! mode: long\n    mov qword ptr [rsi], 1\n    mov eax, 0xffffffff\n"
                   "    out 0xf0, eax\n    xor eax, eax\n    out 0xf4, al\n")
    proc = run_cli("dirty", "--payload", src, "--tracker", "ring", "--vcpus", "1",
                   "--pages", "16", "--iterations", "1")
    lines = proc.stdout.splitlines()
    head = next(line for line in lines if "tracker" in line and "reported" in line)
    rows = [line for line in lines if " ring " in line]
    assert [r.split()[0] for r in rows] == ["4294967295"], proc.stdout
    for row in rows:      # every column ends where its heading does
        for word in ("tracker", "reported", "collect"):
            at = head.index(word) + len(word)
            assert row[at:at + 1] in (" ", ""), (word, head, row)
    assert head.index("tracker") == rows[0].index("ring")


def test_a_payload_that_syncs_less_than_asked_is_said_to():
    # hello_long never syncs: "agree on every iteration" with 3 asked and none made
    proc = run_cli("dirty", "--payload", "hello_long", "--iterations", "3", "--pages", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("; the payload synced for 0 of the 3 iteration(s) "
                                         "asked, so only the final collection was made")
    full = run_cli("dirty", "--pages", "64", "--iterations", "3")       # dirty_seq: all 3
    assert full.returncode == 0 and "synced for" not in full.stdout


def test_a_payload_that_tags_every_sync_alike_synced_all_it_was_asked(tmp_path):
    # a tag is the payload's own: dirty_seq tagging each sync 0 synced 3 times (0, 0#2,
    # 0#3), and the verdict said it "synced for 1 of the 3 iteration(s) asked"
    src = (ROOT / "guest_payloads" / "dirty_seq.asm").read_text()
    assert "    mov eax, r15d\n" in src
    asm = tmp_path / "tag0.asm"
    asm.write_text(src.replace("    mov eax, r15d\n", "    xor eax, eax\n"))
    proc = run_cli("dirty", "--payload", str(asm), "--iterations", "3", "--pages", "64")
    assert proc.returncode == 0, proc.stderr
    assert "0#3" in proc.stdout and "synced for" not in proc.stdout, proc.stdout
