"""The ring view: each vCPU's ring around each collection, checked entry by entry."""
import json

import numpy as np

from minivmm.dirty.report import ring_strip, ring_view_text
from minivmm.dirty.tracker import DirtySession
from tests.conftest import payload, run_cli
from tests.kvm.conftest import small_ring


def test_ring_views_follow_the_protocol():
    # each vCPU writes entries / 2 + 32 pages an iteration: iteration 2 wraps past the end
    # whichever vCPU logs the shared page-table pages, and no iteration fills the ring
    entries = small_ring()
    with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=2, pages=entries + 64,
                      iterations=2, ring_entries=entries, show_ring=True) as s:
        recs = s.run(timeout=60)
    first, second = recs[0], recs[1]
    for r in (first, second):
        views = r.collection.ring_views
        total = sum(v["harvested"] for v in views.values())
        for i, v in views.items():
            n = v["entries"]
            before, mid, after = (np.asarray(v[k]) & 3 for k in
                                  ("before", "harvested_flags", "after_reset"))
            # harvesting turns exactly the DIRTY entries from the fetch index into RESET
            assert (before == 1).sum() == v["harvested"] == v["fetch_after"] - v["fetch_before"]
            pos = [(v["fetch_before"] + k) % n for k in range(v["harvested"])]
            assert np.all(before[pos] == 1) and np.all(mid[pos] == 2)
            assert (mid == 1).sum() == 0
            assert np.all(after == 0)                    # the reset cleared them all
            assert v["reset_returned"] == total          # summed over both vCPUs' rings
    # iteration 2 continues where iteration 1 left off, wrapping past the ring's end
    v0 = second.collection.ring_views[0]
    assert v0["fetch_before"] == first.collection.ring_views[0]["fetch_after"]
    assert v0["fetch_after"] > entries \
        and v0["fetch_after"] % entries < v0["fetch_before"] % entries
    text = ring_view_text(recs)
    assert "KVM_RESET_DIRTY_RINGS returned" in text and "before harvest  |" in text


def test_ring_strip_marks_states_and_fetch():
    flags = np.zeros(256, np.uint32)
    flags[0:8] = 1
    flags[8:16] = 2
    line, mark = ring_strip(flags, fetch=8, width=32)
    assert line[0] == "D" and line[1] == "R" and set(line[2:]) == {"."}
    assert mark.index("^") == 1


def test_cli_show_ring_json_has_counts():
    proc = run_cli("dirty", "--tracker", "ring", "--vcpus", "1", "--pages", "64",
                   "--iterations", "2", "--ring-entries", str(small_ring()), "--show-ring", "--json")
    assert proc.returncode == 0, proc.stderr
    it = json.loads(proc.stdout)["runs"][0]["iterations"][0]
    view = it["ring_view"]["0"]
    assert view["harvested"] == view["before_harvest"]["dirty"] >= 64
    assert view["after_harvest"]["dirty"] == 0 and view["after_reset"]["reset"] == 0
    assert view["reset_returned"] == view["harvested"]


def test_ring_views_keep_a_byte_per_entry():
    # three copies per vCPU and collection: as u32 flags 100 iterations of 8 vCPUs with
    # 65536-entry rings held 600 MB; the view needs only the DIRTY and RESET bits
    entries = small_ring()
    with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=2, pages=256,
                      iterations=2, ring_entries=entries, show_ring=True) as s:
        recs = s.run(timeout=60)
    for r in recs:
        for v in r.collection.ring_views.values():
            for key in ("before", "harvested_flags", "after_reset"):
                assert v[key].nbytes == entries and int(v[key].max(initial=0)) <= 3


def test_the_view_says_what_the_collections_own_reset_returned(monkeypatch):
    # Ring-full exits reset before the collection does; the view's count is the one of
    # the reset after its harvest, as KVM returned it (here one more than was harvested)
    with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=1, pages=8192,
                      iterations=1, show_ring=True) as s:
        real = s.machine.vm.reset_dirty_rings
        monkeypatch.setattr(s.machine.vm, "reset_dirty_rings", lambda: real() + 1)
        recs = s.run(timeout=60)
    c = recs[0].collection
    assert c.ring_full_exits >= 1 and len(c.resets) == c.ring_full_exits + 1, c.resets
    got, harvested = c.resets[-1]
    assert got == harvested + 1 != c.resets[0][0]
    assert c.ring_views[0]["reset_returned"] == got
