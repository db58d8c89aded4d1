"""The host probe of `make bench`: it must really run at ring-full exits."""
from benchmarks.dirty import bench_host


def test_host_probe_runs_each_probe_at_ring_full_exits():
    (row,) = bench_host()
    assert "error" not in row
    # 16384 pages through a 4096-entry ring over 10 iterations: about 40 ring-full exits,
    # shared round-robin between the four probes
    assert set(row["probes"]) == {"an uncontended lock", "an 8-element numpy add",
                                  "a numpy reduction", "a 64 KiB copy"}
    for name, p in row["probes"].items():
        assert p["n"] >= 5, name
        assert p["first_us"] > 0 and p["again_us"] > 0, name
    assert row["info"].startswith("first run at a ring-full exit: ")
