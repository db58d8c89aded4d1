"""The --plot picture and the dirty options checked before any VM runs, without KVM."""
import os
import stat

import pytest

from minivmm import cli
from minivmm.dirty import report

pytest.importorskip("matplotlib")


def _iteration(n, pages, missed=()):
    missed = list(missed)
    return {"iteration": n, "pages": {"data": list(pages)}, "missed_pages": missed[:64]}


def _capture(monkeypatch):
    """Every scatter the plot draws: (label, marker, y values)."""
    from matplotlib.axes import Axes
    drawn = []
    real = Axes.scatter

    def scatter(self, x, y, *a, **kw):
        drawn.append((kw.get("label"), kw.get("marker"), list(y)))
        return real(self, x, y, *a, **kw)
    monkeypatch.setattr(Axes, "scatter", scatter)
    return drawn


def test_the_legend_names_every_group_even_if_iteration_1_lacks_it(tmp_path, monkeypatch):
    drawn = _capture(monkeypatch)
    summary = {"payload": "dirty_seq", "collect": "sync", "runs": [
        {"tracker": "ring", "iterations": [_iteration(1, range(100)),
                                           _iteration(2, range(90), missed=range(90, 100))]},
        {"tracker": "bitmap", "iterations": [_iteration(1, range(100)),
                                             _iteration(2, range(100))]}]}
    report.plot(summary, str(tmp_path / "p.png"))
    labels = [label for label, _, _ in drawn if label]
    # the bitmap-only pages and the misses first appear in iteration 2: they used to be
    # drawn without a legend entry (labels were given at x == 0 only)
    assert sorted(labels) == ["bitmap", "both", "missed"]


def test_every_miss_is_marked_not_only_the_first_64(tmp_path, monkeypatch):
    drawn = _capture(monkeypatch)
    summary = {"payload": "dirty_seq", "collect": "sync", "runs": [
        {"tracker": "ring", "iterations": [_iteration(1, range(300, 1000), missed=range(300))]}]}
    report.plot(summary, str(tmp_path / "p.png"), missed={"ring": {"1": list(range(300))}})
    marked = [y for _, marker, ys in drawn if marker == "x" for y in ys]
    assert sorted(marked) == list(range(300))


def _fake_bitmap_run(monkeypatch, records, ok):
    """cmd_dirty over a bitmap run that returns `records`, with no VM and no checks."""
    monkeypatch.setattr(cli, "_check_plot_path", lambda *a: None)
    monkeypatch.setattr(cli, "_check_payload_params", lambda args: None)
    monkeypatch.setattr(cli, "load", lambda p: p)

    class T:
        name = "bitmap"

    class S:
        nvcpus = 1

        class payload:
            name = "x"
    monkeypatch.setattr(cli, "_run_dirty_session", lambda args, kind: (T(), records, None, S()))
    monkeypatch.setattr(report, "to_json", lambda a, runs: {"ok": ok, "runs": []})


def test_cmd_dirty_hands_the_plot_every_miss(tmp_path, monkeypatch):
    """cmd_dirty passes the records' full miss lists, not the JSON's first 64."""
    import numpy as np
    got = {}
    monkeypatch.setattr(report, "plot", lambda summary, path, missed=None: got.update(missed))

    class Rec:
        iteration, ok = 1, False
        missed = np.arange(300)
    _fake_bitmap_run(monkeypatch, [Rec()], ok=False)
    monkeypatch.setattr(report, "table", lambda s: "")
    monkeypatch.setattr(report, "verdict", lambda s: "")
    assert cli.main(["dirty", "--tracker", "bitmap", "--plot", str(tmp_path / "p.png"),
                     "--json"]) == 1
    assert got == {"bitmap": {"1": list(range(300))}}


@pytest.mark.parametrize("tracker", ["both", "auto", "bitmap"])
def test_initially_set_without_manual_protect_is_refused_before_any_run(tracker, monkeypatch,
                                                                         capsys):
    # with both (or auto), the ring's whole run used to come first: the refusal came
    # after it, from the bitmap tracker's constructor
    def no_run(*a, **kw):
        raise AssertionError("a VM ran before the options were checked")
    monkeypatch.setattr(cli, "_run_dirty_session", no_run)
    assert cli.main(["dirty", "--tracker", tracker, "--initially-set",
                     "--no-manual-protect"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INITIALLY_SET is an option of manual protect" in err[0]


def test_a_tag_synced_twice_gets_a_column_per_collection(tmp_path, monkeypatch):
    # Columns were keyed by tag: the second (empty) collection of tag 1 replaced the
    # first, and a picture of 64 reported pages showed none
    drawn = _capture(monkeypatch)
    summary = {"payload": "mine", "collect": "sync", "runs": [
        {"tracker": t, "iterations": [_iteration(1, range(64)), _iteration(1, []),
                                      _iteration("final", [])]} for t in ("ring", "bitmap")]}
    report.plot(summary, str(tmp_path / "p.png"))
    assert [(label, ys) for label, _, ys in drawn] == [("both", list(range(64)))]
    assert report.collection_keys([1, 1, 2, 1, "final"]) == ["1", "1#2", "2", "1#3", "final"]


def test_a_picture_the_disk_cannot_hold_is_one_line_after_the_results(tmp_path, monkeypatch,
                                                                       capsys):
    # _check_plot_path opens the file before the run, but the disk can fill up by the
    # time the picture is drawn: PIL's ENOSPC was a traceback, and the table never printed
    import errno

    def full(summary, path, missed=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report, "plot", full)
    _fake_bitmap_run(monkeypatch, [], ok=True)
    monkeypatch.setattr(report, "table", lambda s: "the table")
    png = str(tmp_path / "p.png")
    assert cli.main(["dirty", "--tracker", "bitmap", "--plot", png]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "the table\n"          # the results, and no "picture:" line
    assert err == f"minivmm: --plot: cannot write {png}: No space left on device\n"


def test_columns_follow_collection_order_not_tag_order(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    ticks = []
    real = Axes.set_xticks
    monkeypatch.setattr(Axes, "set_xticks",
                        lambda self, pos, labels=None, **kw: ticks.append(list(labels))
                        or real(self, pos, labels, **kw))
    summary = {"payload": "mine", "collect": "sync", "runs": [
        {"tracker": "ring", "iterations": [_iteration(t, [n]) for n, t in
                                           enumerate([3, 1, 1, 2, "final"])]}]}
    report.plot(summary, str(tmp_path / "p.png"))
    assert ticks == [["3", "1", "1#2", "2", "final"]]


def _saved_figure(monkeypatch):
    """What the figure looked like as it was saved: the axes, the legend and a renderer."""
    from matplotlib.figure import Figure
    seen = {}
    real = Figure.savefig

    def savefig(self, *a, **kw):
        seen.update(ax=self.axes[0], renderer=self.canvas.get_renderer())
        return real(self, *a, **kw)
    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def _every_page(columns, pages, missed=()):
    return {"payload": "dirty_seq", "collect": "sync", "runs": [
        {"tracker": t, "iterations": [_iteration(n, range(pages),
                                                 missed=missed if t == "ring" else ())
                                      for n in range(1, columns + 1)]}
        for t in ("ring", "bitmap")]}


def test_fifty_columns_have_tick_labels_that_do_not_run_together(tmp_path, monkeypatch):
    # a label per column: at 50 iterations "10", "11", "12" touched and read "101112"
    seen = _saved_figure(monkeypatch)
    report.plot(_every_page(50, 64), str(tmp_path / "p.png"))
    boxes = [t.get_window_extent(seen["renderer"]) for t in seen["ax"].get_xticklabels()]
    assert len(boxes) >= 10
    assert all(a.x1 + 2 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_the_legend_hides_no_page_and_no_miss(tmp_path, monkeypatch):
    # upper right, inside the axes, it covered the top pages of the last columns, misses too
    seen = _saved_figure(monkeypatch)
    report.plot(_every_page(50, 64, missed=[63]), str(tmp_path / "p.png"))
    ax = seen["ax"]
    box = ax.get_legend().get_window_extent(seen["renderer"])
    under = [tuple(xy) for c in ax.collections for xy in c.get_offsets()
             if box.contains(*ax.transData.transform(xy))]
    assert under == []


def test_the_pages_reach_scatter_as_arrays(tmp_path, monkeypatch):
    # as lists, scatter() made a masked array element by element: 36 s of drawing for a
    # 262144-page, 50-iteration run (10 s with arrays, most of it the JSON lists)
    import numpy as np
    from matplotlib.axes import Axes
    kinds = []
    real = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, *a, **kw:
                        kinds.append((type(x), type(y))) or real(self, x, y, *a, **kw))
    report.plot(_every_page(2, 64, missed=[63]), str(tmp_path / "p.png"),
                missed={"ring": {"1": [70], "2": [70]}})
    assert kinds and set(kinds) == {(np.ndarray, np.ndarray)}


def test_a_file_named_dot_png_is_the_picture(tmp_path):
    # matplotlib read ".png" as a name without extension and wrote ".png.png"
    report.plot(_every_page(2, 8), str(tmp_path / ".png"))
    assert [p.name for p in tmp_path.iterdir()] == [".png"]
    assert (tmp_path / ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_leaves_the_earlier_picture_whole(tmp_path, monkeypatch):
    # the disk filled up halfway through the PNG: the previous picture was already
    # truncated, and a broken one was left in its place
    import errno
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    real = FigureCanvasAgg.print_png

    def half_written(self, f, *a, **kw):
        if isinstance(f, io.BytesIO):       # matplotlib's dry run, to lay the figure out
            return real(self, f)
        f = open(f, "wb") if isinstance(f, str) else f
        f.write(b"\x89PNG\r\n\x1a\n half")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    png = tmp_path / "p.png"
    png.write_bytes(b"the earlier picture")
    png.chmod(0o640)
    monkeypatch.setattr(FigureCanvasAgg, "print_png", half_written)
    with pytest.raises(OSError):
        report.plot(_every_page(2, 8), str(png))
    assert png.read_bytes() == b"the earlier picture"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]       # no temporary left
    monkeypatch.undo()
    report.plot(_every_page(2, 8), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_mode & 0o777 == 0o640


def test_a_matplotlib_that_will_not_import_is_refused_before_any_run(tmp_path, monkeypatch,
                                                                     capsys):
    # found but broken (built for another numpy, PIL uninstalled): the ImportError came
    # after the whole run, as a traceback, and the table was never printed
    import sys
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("numpy.core.multiarray failed to '
                                      'import")\n')
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    def no_run(*a, **kw):
        raise AssertionError("a VM ran before the options were checked")
    monkeypatch.setattr(cli, "_run_dirty_session", no_run)
    assert cli.main(["dirty", "--plot", str(tmp_path / "p.png")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == ("minivmm: --plot needs matplotlib, which failed to import: "
                   "numpy.core.multiarray failed to import\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_png_link_to_a_device_writes_through_it_not_over_it(tmp_path):
    # a picture.png symlink to /dev/null (discard it): the rename replaced the device
    # node itself with a regular file. A node of our own here, not the host's /dev/null
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (tmp_path / "p.png").symlink_to(dev)
    report.plot(_every_page(2, 8), str(tmp_path / "p.png"))
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "p.png"]


def test_a_name_of_255_bytes_is_written(tmp_path):
    # --plot's check opened it, then the temporary (".NAME.PID.tmp") was too long a name:
    # ENAMETOOLONG after the whole run
    png = tmp_path / ("a" * 251 + ".png")
    report.plot(_every_page(2, 8), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == [png.name]


def test_a_directory_that_takes_no_new_file_gets_the_picture_in_place(tmp_path, monkeypatch):
    # a file the user may write in a directory they may not (or chattr +i): --plot's
    # check passed, and the temporary beside it failed after the run (EPERM, EACCES)
    import errno
    png = tmp_path / "p.png"
    png.write_bytes(b"the earlier picture")
    real_open = os.open

    def no_new_file(name, flags, *a, **kw):
        if flags & os.O_CREAT and os.fspath(name) != str(png):
            raise PermissionError(errno.EPERM, "Operation not permitted", name)
        return real_open(name, flags, *a, **kw)
    monkeypatch.setattr(os, "open", no_new_file)
    report.plot(_every_page(2, 8), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
