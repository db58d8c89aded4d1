"""Bitmap decoding, CLEAR pieces, ring-size rules and the oracles, without KVM."""

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from minivmm.dirty import bitmap as B
from minivmm.dirty.ringsize import validate_entries
from minivmm.dirty.verify import ContentOracle, lcg_pages, plan, resident_pages
from minivmm.memory import GuestMemory

LIMITS = {"min_entries": 256, "max_entries": 65536, "reserved_entries": 64}


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 224, 1000, 4096 + 3])
def test_bitmap_round_trip_and_bit_order(npages):
    rng = np.random.default_rng(npages)
    pages = np.unique(rng.integers(0, npages, size=min(npages, 50))).astype(np.uint64)
    words = B.encode(pages, npages)
    assert len(words) == (npages + 63) // 64               # ALIGN(npages, 64) / 8 bytes
    assert np.array_equal(B.decode(words, npages), pages)
    # bit i of the little-endian words is page i (abi.md rule 52)
    raw = words.astype("<u8").tobytes()
    for p in pages.tolist():
        assert raw[p // 8] >> (p % 8) & 1


def test_decode_ignores_bits_past_the_slot():
    words = np.array([~np.uint64(0)], np.uint64)
    assert B.decode(words, 10).tolist() == list(range(10))


def test_decode_of_no_set_bit_is_an_empty_uint64_array():
    for words in (np.zeros(2, np.uint64), np.zeros(0, np.uint64)):
        out = B.decode(words, 128)
        assert isinstance(out, np.ndarray) and out.dtype == np.uint64 and out.shape == (0,)


def test_encode_takes_any_integer_sequence():
    # abi-check passes a list; page numbers as int64 too (np.unique of int pages)
    want = np.array([1 | 1 << 63, 1 << 1, 0], np.uint64)
    for pages in ([0, 63, 65], np.array([0, 63, 65], np.int64)):
        assert B.encode(pages, 130).tolist() == want.tolist()


class FakeVm:
    """Records CLEAR calls; stands in for the VM only to check piece arithmetic."""

    def __init__(self):
        self.calls = []
        self.memory = {}            # no GuestMemory: slots the test never maps
        self.slot_sizes = {}        # nor any slot KVM holds

    def clear_dirty_log(self, slot, first, num, addr):
        self.calls.append((slot, first, num))


@pytest.mark.parametrize("pages,npages,expect", [
    ([0, 1, 2], 4096, [(0, 64)]),
    ([5, 12799], 12800, [(0, 64), (12736, 64)]),                # far apart: two pieces
    ([5, 64 * 30 + 1], 4096, [(0, 64 * 31)]),                  # a short gap is bridged
    ([1000 * 64 + 1, 1000 * 64 + 2], 1000 * 64 + 3, [(64000, 3)]),  # last piece ends the slot
])
def test_clear_pieces_are_64_page_aligned(pages, npages, expect):
    vm = FakeVm()
    bm = B.SlotBitmap(vm, 1, npages)
    calls = bm.clear(B.encode(np.array(pages, np.uint64), npages))
    assert [(f, n) for _, f, n in vm.calls] == expect and calls == len(expect)
    for _, first, num in vm.calls:
        assert first % 64 == 0
        assert num % 64 == 0 or first + num == npages


def test_a_slot_bitmap_smaller_than_its_slot_is_refused():
    # KVM_GET_DIRTY_LOG writes the slot's whole bitmap: a 1 Mi-page slot given 64 pages
    # wrote 128 KiB into an 8-byte buffer and crashed the interpreter
    vm = FakeVm()
    vm.slot_sizes[1] = 4096 << 20
    with pytest.raises(ValueError, match="slot 1 holds 1048576 pages, not 64"):
        B.SlotBitmap(vm, 1, 64)
    assert B.SlotBitmap(vm, 1, 1 << 20).nwords == 1 << 14


@pytest.mark.parametrize("second_word,expect", [
    (64, [(0, 65 * 64)]),                          # 63 zero words between: bridged
    (65, [(0, 64), (65 * 64, 64)]),                # 64 zero words: two pieces
])
def test_clear_bridges_gaps_shorter_than_clear_gap_words(second_word, expect):
    assert B.CLEAR_GAP_WORDS == 64
    vm = FakeVm()
    npages = 100 * 64
    bm = B.SlotBitmap(vm, 1, npages)
    assert bm.clear(B.encode([5, second_word * 64 + 7], npages)) == len(expect)
    assert [(f, n) for _, f, n in vm.calls] == expect


def test_clear_of_no_set_bit_makes_no_call():
    vm = FakeVm()
    bm = B.SlotBitmap(vm, 1, 64 * 300)
    assert bm.clear(np.zeros(300, np.uint64)) == 0 and vm.calls == [] and bm.clear_calls == 0


def test_clear_hands_kvm_contiguous_words():
    # a strided view: KVM reads 8-byte words from the address it is given
    seen = []

    class ReadingVm(FakeVm):
        def clear_dirty_log(self, slot, first, num, addr):
            seen.append(ctypes.string_at(addr, (num + 63) // 64 * 8))

    npages = 64 * 10000
    words = B.encode([3, 64 * 9000 + 1], npages)
    strided = np.repeat(words, 2)[::2]
    B.SlotBitmap(ReadingVm(), 1, npages).clear(strided)
    assert seen == [(1 << 3).to_bytes(8, "little"), (1 << 1).to_bytes(8, "little")]


class GetVm(FakeVm):
    """GET_DIRTY_LOG fills in the given bits; CLEAR is recorded."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def get_dirty_log(self, slot, addr):
        raw = self.bits.astype("<u8").tobytes()
        ctypes.memmove(addr, raw, len(raw))


@pytest.mark.parametrize("pages,clear,calls", [
    ([], True, 0),             # nothing collected: nothing to clear
    ([1, 70], False, 0),       # no manual protect: GET cleared them already
    ([1, 70], True, 1),
])
def test_collect_clears_only_when_asked_and_bits_were_set(pages, clear, calls):
    vm = GetVm(B.encode(pages, 128))
    bm = B.SlotBitmap(vm, 2, 128)
    buf, n = bm.collect(clear)
    assert n == len(pages) and len(vm.calls) == calls
    assert B.decode(np.frombuffer(buf, np.uint64), 128).tolist() == pages


@pytest.mark.parametrize("npages", [1, 64, 4096, 12801, 64 * B.WHOLE_SLOT_WORDS])
def test_small_slots_clear_in_one_call_over_the_whole_slot(npages):
    vm = FakeVm()
    bm = B.SlotBitmap(vm, 3, npages)
    words = B.encode(np.array([0, npages - 1], np.uint64), npages)
    assert bm.clear_collected(words) == 1 and vm.calls == [(3, 0, npages)]
    assert bm.clear_calls == 1


def test_big_slots_clear_in_pieces():
    vm = FakeVm()
    npages = 64 * B.WHOLE_SLOT_WORDS + 1
    bm = B.SlotBitmap(vm, 3, npages)
    bm.clear_collected(B.encode(np.array([0, npages - 1], np.uint64), npages))
    assert [(f, n) for _, f, n in vm.calls] == [(0, 64), (npages - 1, 1)]
    assert bm.clear_calls == 2


@pytest.mark.parametrize("entries,word", [(0, "power of two"), (3000, "power of two"),
                                          (128, "too small"), (1 << 17, "too large")])
def test_ring_size_rules(entries, word):
    with pytest.raises(ValueError, match=word):
        validate_entries(entries, LIMITS)


def test_ring_size_accepts_the_range():
    for e in (256, 4096, 65536):
        validate_entries(e, LIMITS)
    with pytest.raises(ValueError, match="no dirty ring"):
        validate_entries(4096, {"min_entries": 256, "max_entries": 0, "reserved_entries": 64})


def test_content_oracle_finds_misses_and_extras():
    mem = GuestMemory(1, 0, 8 * 4096)
    oracle = ContentOracle(mem, 8)
    view = np.frombuffer(mem.map, dtype="<u8")
    view[0 * 512] = 1
    view[3 * 512] = 1
    res = oracle.check(np.array([0, 5]))
    assert res["changed"].tolist() == [0, 3]
    assert res["missed"].tolist() == [3] and res["extra"].tolist() == [5]
    res = oracle.check(np.array([], np.int64))               # nothing changed since
    assert not len(res["changed"]) and not len(res["missed"])
    assert resident_pages(mem.host_addr, 8).tolist() == [0, 3]   # only what was written
    del view
    mem.close()


def test_the_content_oracle_sees_every_page_of_a_slot_of_more_than_4096_pages():
    # mincore() is asked about pages * 4096 bytes: any shorter length leaves the last
    # pages of a large slot unread, and a write there is never found missing
    pages = 3 * 4096 + 5
    mem = GuestMemory(1, 0, pages * 4096)
    oracle = ContentOracle(mem, pages)
    view = np.frombuffer(mem.map, dtype="<u8")
    view[(pages - 1) * 512] = 7
    view[(pages - 2) * 512] = 7
    assert {pages - 2, pages - 1} <= set(resident_pages(mem.host_addr, pages).tolist())
    res = oracle.check(np.array([pages - 2], np.int64))
    assert res["changed"].tolist() == [pages - 2, pages - 1]
    assert res["missed"].tolist() == [pages - 1] and not len(res["extra"])
    del view
    mem.close()


def test_resident_pages_raises_rather_than_say_nothing_is_resident():
    # a failed mincore() leaves the vector zero: "no page resident" would blind the oracle
    import errno
    with pytest.raises(OSError) as e:
        resident_pages(0, 1)                     # nothing is mapped at address 0
    assert e.value.errno == errno.ENOMEM


def test_lcg_plan_replays_the_generator_and_jumps_ahead():
    seq = lcg_pages(7, 100, 10, 1).tolist() + lcg_pages(7, 100, 10, 2).tolist()
    # iteration 2 continues the same generator, computed by the jump-ahead
    x, manual = 7, []
    for _ in range(20):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2 ** 64
        manual.append((x >> 33) % 100)
    assert seq == manual
    # no page to pick from, or no write: nothing (abicheck replays these too)
    for args in ((7, 0, 10, 1), (7, 100, 0, 3)):
        got = lcg_pages(*args)
        assert got.dtype == np.int64 and got.tolist() == [], args


def test_plans_per_payload():
    p = plan("dirty_seq", 2, 10, 1, {})
    assert p[0].tolist() == [0, 1, 2, 3, 4] and p[1].tolist() == [5, 6, 7, 8, 9]
    p = plan("dirty_stride", 2, 20, 3, {"stride": 4})
    assert p[0].tolist() == [0, 4, 8] and p[1].tolist() == [10, 14, 18]
    assert plan("my_own_payload", 1, 10, 1, {}) is None
    # the guest takes a stride of 0 (or none given: R8 is 0) as 1, every page
    for params in ({"stride": 1}, {"stride": 0}, {}):
        assert plan("dirty_stride", 1, 6, 2, params)[0].tolist() == [0, 1, 2, 3, 4, 5], params
    assert plan("dirty_stride", 2, 9, 1, {"stride": 2})[1].tolist() == [4, 6]
    # a register not given is 0: no writes at all; seed 0 plus the vCPU index
    assert [len(v) for v in plan("dirty_random", 2, 100, 1, {"seed": 3}).values()] == [0, 0]
    p = plan("dirty_random", 2, 100, 2, {"writes": 5})
    assert [p[0].tolist(), p[1].tolist()] == [
        sorted(set((lcg_pages(i, 50, 5, 2) + 50 * i).tolist())) for i in (0, 1)]


class _Resets:
    """A VM whose KVM_RESET_DIRTY_RINGS returns the given counts, one per call."""
    def __init__(self, counts):
        self.counts, self.calls = list(counts), 0

    def reset_dirty_rings(self):
        self.calls += 1
        return self.counts.pop(0) if self.counts else 0


@pytest.mark.parametrize("first,more,harvested,total,calls", [
    (7894, [32836 - 7894], 32836, 32836, 1),        # one stop: the second call finishes
    (0, [100], 100, 100, 1),                         # stopped before it started
    (10, [5, 5, 80], 100, 100, 3),
    (90, [0, 10], 100, 90, 1),                       # nothing left: stop, report it
    (50, [1] * 40, 100, 65, 15),                     # at most RESET_CALLS calls in all
])
def test_a_partial_reset_is_finished(first, more, harvested, total, calls):
    from minivmm.dirty.ring import RESET_CALLS, finish_reset
    vm = _Resets(more)
    assert finish_reset(vm, first, harvested) == (total, calls) and vm.calls == calls
    assert 1 + calls <= RESET_CALLS


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_lcg_pages_equals_a_step_by_step_replay(monkeypatch, chunk):
    from minivmm.dirty import verify as V
    monkeypatch.setattr(V, "_LCG_CHUNK", chunk)
    V._lcg_steps.cache_clear()

    def replay(seed, share, writes, iteration):
        x, out = seed % 2 ** 64, []
        for k in range(iteration * writes):
            x = (x * V.LCG_MUL + V.LCG_ADD) % 2 ** 64
            if k >= (iteration - 1) * writes:
                out.append((x >> 33) % share)
        return out
    for args in [(1, 100, 1, 1), (5, 512, 100, 3), (2 ** 64 - 1, 7, 1000, 2), (123, 4096, 777, 4)]:
        assert V.lcg_pages(*args).tolist() == replay(*args), args
    V._lcg_steps.cache_clear()


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_the_random_plan_is_the_set_of_pages_the_generator_hits(monkeypatch, chunk):
    from minivmm.dirty import verify as V
    monkeypatch.setattr(V, "_LCG_CHUNK", chunk)
    V._lcg_steps.cache_clear()
    for args in [(1, 100, 1, 1), (5, 512, 100, 3), (2 ** 64 - 1, 7, 1000, 2), (9, 3, 50, 5),
                 (123, 4096, 777, 4), (1, 10, 0, 1), (3, 1, 4, 2), (1, 0, 5, 1)]:
        assert V.lcg_page_set(*args).tolist() == sorted(set(V.lcg_pages(*args).tolist())), args
    V._lcg_steps.cache_clear()


def test_the_random_plan_of_the_largest_writes_needs_no_memory_per_write():
    # --writes 2**32-1 over a small share: the guest writes it in seconds, and the plan
    # once asked for all 32 GiB of its page numbers ("Unable to allocate 32.0 GiB")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from minivmm.dirty.verify import plan\n"
            "p = plan('dirty_random', 2, 128, 3, {'seed': 1, 'writes': 2 ** 32 - 1})\n"
            "print(sorted(len(v) for v in p.values()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == "[64, 64]"


def _ring_summary(rec, payload="dirty_seq"):
    """report.to_json() of one ring run of 4 pages whose vCPUs ended well, made of `rec`."""
    from minivmm.dirty import report

    class Tracker:
        name, cap = "ring", 223

    class Result:
        ok, vcpus = True, []
    return report.to_json({"payload": payload, "vcpus": 1, "pages": 4, "iterations": 1,
                           "collect": "sync", "ring_entries": 256},
                          [(Tracker(), [rec], Result())])


def test_the_verdict_names_bogus_entries_and_never_says_ok_for_a_run_that_is_not():
    # A collection with a bogus ring entry is not ok (IterationRecord.ok, the JSON's "ok",
    # exit status 1); the verdict said "OK - ... no page missed" all the same.
    from minivmm.dirty import report
    from minivmm.dirty.tracker import Collection, IterationRecord
    empty, pages = np.empty(0, np.int64), np.arange(4, dtype=np.int64)
    col = Collection(sets={}, raw=None, entries=5, bogus=[(1, 4096)], resets=[(5, 5)])
    col._pages = {1: pages}
    rec = IterationRecord(1, "ring", col, pages, pages, pages, empty, empty,
                          [{"vcpu": 0, "reported": 4, "expected": 4, "missed": 0, "extra": 0}])
    summary = _ring_summary(rec)
    assert not rec.ok and not summary["ok"]
    verdict = report.verdict(summary)
    assert verdict.startswith("verdict: FAIL") and "1 ring entry named no page" in verdict
    # a loss is named by its own note, not always as an overflow
    col.bogus, col.lost = [], ["KVM_RESET_DIRTY_RINGS stopped after 3 of 5 entries", "x"]
    summary = _ring_summary(rec)
    assert report.verdict(summary).endswith(
        "ring: pages lost (KVM_RESET_DIRTY_RINGS stopped after 3 of 5 entries; 1 more)")


def test_the_verdict_fails_a_run_that_missed_pages_or_miscounted_a_reset():
    from minivmm.dirty import report
    from minivmm.dirty.tracker import Collection, IterationRecord
    empty, pages = np.empty(0, np.int64), np.arange(4, dtype=np.int64)

    def verdict(missed, resets, lost=()):
        col = Collection(sets={}, raw=None, entries=4, resets=resets, lost=list(lost))
        col._pages = {1: pages[:4 - len(missed)]}
        rec = IterationRecord(1, "ring", col, pages[:4 - len(missed)], pages, pages,
                              np.array(missed, np.int64), empty,
                              [{"vcpu": 0, "reported": 4 - len(missed), "expected": 4,
                                "missed": len(missed), "extra": 0}])
        summary = _ring_summary(rec)
        assert summary["ok"] is rec.ok
        return report.verdict(summary)
    assert verdict([2, 3], [(4, 4)]) == "verdict: FAIL - ring missed 2 page(s)"
    assert verdict([], [(3, 4)]) == ("verdict: FAIL - ring: KVM_RESET_DIRTY_RINGS count "
                                     "disagreed with the harvest")
    # one loss note: nothing "more" to count
    assert verdict([], [(4, 4)], ["overrun"]) == "verdict: FAIL - ring: pages lost (overrun)"
    assert verdict([], [(4, 4)]).startswith("verdict: OK")
    # two vCPUs ended badly: the first is named, and one more counted
    summary = {"runs": [{"tracker": "ring", "iterations": [], "vcpus_ok": False,
                         "vcpu_ends": [{"reason": "timeout"}, {"reason": "timeout"}]}]}
    assert report.verdict(summary) == ("verdict: FAIL - ring: vCPU 0 ended badly (stopped by "
                                       "--timeout; 1 more vCPU(s) too)")


def test_the_verdict_says_when_the_content_oracle_saw_no_reported_page_change():
    # A payload writing past the first 8 bytes of its pages: every reported page was
    # "extra" (first u64 unchanged), and the verdict still claimed each was checked
    from minivmm.dirty import report
    from minivmm.dirty.tracker import Collection, IterationRecord
    empty, pages = np.empty(0, np.int64), np.arange(4, dtype=np.int64)

    def verdict(changed, expected=None):
        col = Collection(sets={}, raw=None, entries=4, resets=[(4, 4)])
        col._pages = {1: pages}
        extra = np.setdiff1d(pages, changed)
        rec = IterationRecord(1, "ring", col, pages, expected, changed, empty, extra,
                              [{"vcpu": 0, "reported": 4, "expected": None, "missed": 0,
                                "extra": len(extra)}])
        return report.verdict(_ring_summary(rec, "mine"))
    blind = verdict(empty)
    assert blind.startswith("verdict: OK") and "none of them changed its first 8 bytes" in blind
    assert "first 8 bytes" not in verdict(pages[:1])          # one page seen to change
    assert "first 8 bytes" not in verdict(empty, pages)       # the plan oracle checked them


def test_only_the_shipped_payloads_have_a_plan(tmp_path):
    # plan() is keyed by name: a user's own dirty_seq.asm that writes every other page
    # must not be held to the shipped dirty_seq's plan (its pages would all be "missed")
    from minivmm.dirty.verify import has_plan
    from minivmm.payload import load, payload_dir
    shipped = (payload_dir() / "dirty_seq.asm").read_text()
    assert has_plan(load(str(payload_dir() / "dirty_seq.asm")))
    copy = tmp_path / "dirty_seq.asm"
    copy.write_text(shipped)
    assert has_plan(load(str(copy)))                 # the same code, elsewhere: same plan
    mine = tmp_path / "mine" / "dirty_seq.asm"
    mine.parent.mkdir()
    mine.write_text(shipped.replace("add rdi, 4096", "add rdi, 8192"))
    assert not has_plan(load(str(mine)))
    assert not has_plan(load(str(payload_dir() / "hello_long.asm")))


def test_a_record_without_pages_does_not_claim_an_empty_data_slot():
    from minivmm.dirty.tracker import Collection, IterationRecord
    empty, pages = np.empty(0, np.int64), np.arange(4, dtype=np.int64)
    col = Collection(sets={}, raw=None)
    col._pages = {1: pages}
    rec = IterationRecord(1, "ring", col, pages, pages, pages, empty, empty, [])
    assert rec.to_dict(with_pages=False)["pages"] == {}
    assert rec.to_dict()["pages"]["data"] == [0, 1, 2, 3]


def test_two_collections_with_one_tag_are_each_compared():
    # A payload may sync twice with one tag; keyed by iteration alone, only the last
    # collection of each tag was compared, and a difference in the first was "agree"
    from types import SimpleNamespace as R
    from minivmm.dirty.tracker import compare_runs

    def rec(it, pages):
        p = np.array(pages, np.int64)
        return R(iteration=it, data_pages=p, changed=p, complete=True)
    a = [rec(1, [3]), rec(1, []), rec(2, [5]), rec(2, [])]
    b = [rec(1, [3]), rec(1, []), rec(2, [6]), rec(2, [])]
    diffs = compare_runs(a, b)
    assert [(d["iteration"], d.get("repeat", 0)) for d in diffs] == [(2, 0)]
    assert diffs[0]["only_first"] == [5] and diffs[0]["only_second"] == [6]
    assert diffs[0]["guests_differ"]               # the content changed elsewhere too
    # skip leaves out only the first collection of that tag (INITIALLY_SET's)
    b[1] = rec(1, [9])
    assert [(d["iteration"], d.get("repeat", 0)) for d in compare_runs(a, b, skip=(1,))] \
        == [(1, 1), (2, 0)]
    # the same guest writes, reported differently: the trackers', not the guests'
    c = [R(iteration=1, data_pages=np.array([3, 4]), changed=np.array([3]), complete=True)]
    assert not compare_runs(c, a[:1])[0]["guests_differ"]


def _collection(tag, pages):
    row = {"vcpu": 0, "reported": len(pages), "expected": None, "missed": 0, "extra": 0}
    return {"iteration": tag, "pages": {"data": list(pages)}, "reported": len(pages),
            "expected": None,
            "missed": 0, "extra": 0, "missed_pages": [], "duplicates": 0,
            "ring_full_exits": 0, "reset_count_ok": True, "collect_s": 0.001, "lost": [],
            "bogus": 0, "vcpus": [row]}


def test_the_table_follows_collection_order_not_tag_order():
    # A payload's tags are its own: synced 3, 1, 1, 2, the rows came out 1, 1#2, 2, 3
    from minivmm.dirty import report
    tags = [3, 1, 1, 2, "final"]
    summary = {"payload": "mine", "vcpus": 1, "pages": 8, "iterations": 4, "collect": "sync",
               "agree": True, "differences": [], "runs": [
                   {"tracker": t, "vcpus_ok": True, "vcpu_ends": [None],
                    "iterations": [_collection(tag, [n]) for n, tag in enumerate(tags)]}
                   for t in ("ring", "bitmap")]}
    rows = [line.split()[:2] for line in report.table(summary).splitlines()[2:-1]]
    assert rows == [[k, t] for k in ("3", "1", "1#2", "2", "final")
                    for t in ("ring", "bitmap")]
    # a run cut short: the other run's further collections follow, "final" still last
    summary["runs"][0]["iterations"] = [_collection(3, [0]), _collection("final", [])]
    rows = [line.split()[:2] for line in report.table(summary).splitlines()[2:-1]]
    assert [k for k, _ in rows] == \
        ["3", "3", "1", "1#2", "2", "final", "final"]


def test_differences_are_listed_in_collection_order():
    from types import SimpleNamespace as R
    from minivmm.dirty.tracker import compare_runs

    def rec(it, pages):
        p = np.array(pages, np.int64)
        return R(iteration=it, data_pages=p, changed=p, complete=True)
    a = [rec(3, [0]), rec(1, [1]), rec(1, [2]), rec(2, [3]), rec("final", [4])]
    b = [rec(3, [9]), rec(1, [9]), rec(1, [9]), rec(2, [9]), rec("final", [9])]
    assert [(d["iteration"], d.get("repeat", 0)) for d in compare_runs(a, b)] == \
        [(3, 0), (1, 0), (1, 1), (2, 0), ("final", 0)]


@pytest.mark.parametrize("overrun", [set(), {1}])
def test_a_short_reset_after_an_overrun_blames_the_overrun(overrun):
    # Seen on kvm_pvm (emulated CPL0 writes, 256-entry ring, sync collection with signals
    # held): once a ring is overrun every reset falls short, and the note blamed a signal.
    from types import SimpleNamespace
    from minivmm.dirty.tracker import RingTracker
    tracker = RingTracker(256)
    tracker.machine = SimpleNamespace(vm=_Resets([74, 0]))
    tracker._since_reset, tracker._overrun = 256, overrun
    tracker._reset_locked()
    (note,) = tracker._lost
    assert note.startswith("KVM_RESET_DIRTY_RINGS stopped after 74 of 256 entries")
    assert tracker._resets == [(74, 256)] and tracker._reset_retries == 1
    if overrun:
        assert "ring of vCPU 1 was overrun" in note and "signal" not in note
    else:
        assert "a pending signal" in note


def test_a_records_json_lists_at_most_64_missed_and_extra_pages_and_counts_all():
    from minivmm.dirty.tracker import Collection, IterationRecord
    empty = np.empty(0, np.int64)
    col = Collection(sets={}, raw=None, entries=0)
    col._pages = {}
    missed, extra = np.arange(100, dtype=np.int64), np.arange(200, 300, dtype=np.int64)
    rec = IterationRecord(2, "bitmap", col, empty, None, extra, missed, extra, [])
    d = rec.to_dict(with_pages=False)
    assert (d["missed"], d["missed_pages"]) == (100, list(range(64)))
    assert (d["extra"], d["extra_pages"]) == (100, list(range(200, 264)))
    assert (d["expected"], d["reported"], d["pages"]) == (None, 0, {}) and not rec.ok
    # with pages, the data slot's are always given, none or not
    assert rec.to_dict()["pages"] == {"data": []} and "ring_view" not in d
