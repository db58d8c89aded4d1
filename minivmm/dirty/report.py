"""Rendering dirty-tracking runs: the per-iteration table, the JSON object, the picture.

Not a kernel interface; it presents what tracker.py collected and verify.py checked.
"""
from __future__ import annotations

from ..machine import HOST_STOPS, OK_ENDS
from .tracker import compare_runs


def run_summary(tracker, records, result, ring_entries, collect) -> dict:
    ends = [st.end.to_dict() if st.end else None for st in result.vcpus] if result else []
    return {"tracker": tracker.name,
            "ring_entries": ring_entries if tracker.name == "ring" else None,
            "capability": getattr(tracker, "cap", None),
            "manual_protect": getattr(tracker, "manual", None), "collect": collect,
            "initially_set": getattr(tracker, "all_set_first", False),
            "iterations": [r.to_dict() for r in records],
            "vcpu_ends": ends,
            "vcpus_ok": bool(result and result.ok),
            "ok": bool(result and result.ok) and all(r.ok for r in records)}


def to_json(args, runs: list) -> dict:
    # runs cut short (the timeout, a guest that would not stop syncing) stop at different points
    cut = {st.end.reason for _, _, res in runs if res for st in res.vcpus if st.end} \
        & {"timeout", "too-many-syncs"}
    timed_out = bool(cut)
    # With INITIALLY_SET the bitmap's first collection is every page, not what was written:
    # iteration 1, or the final one of a payload that never syncs
    first = next((recs[0].iteration for t, recs, _ in runs
                  if getattr(t, "all_set_first", False) and recs), None)
    diffs = compare_runs(runs[0][1], runs[1][1], completed_only=timed_out,
                         skip=() if first is None else (first,)) if len(runs) == 2 else []
    out = {"payload": args["payload"], "vcpus": args["vcpus"], "pages": args["pages"],
           "iterations": args["iterations"], "collect": args["collect"],
           "runs": [run_summary(t, recs, res, args["ring_entries"], args["collect"])
                    for t, recs, res in runs],
           "agree": not diffs, "differences": diffs}
    notes = []
    if timed_out:
        notes.append("only the iterations both runs completed before "
                     + ("--timeout" if "timeout" in cut else "too many syncs") + " stopped them")
    if first is not None:
        notes.append(f"not {_collection_name(first)}: with --initially-set the bitmap's first "
                     "collection reports every page (api.rst 7.18)")
    if len(runs) == 2 and notes:
        out["compared"] = "; ".join(notes)
    out["ok"] = all(r["ok"] for r in out["runs"]) and out["agree"]
    return out


def _collection_name(iteration) -> str:
    return "the final collection" if iteration == "final" else f"iteration {iteration}"


def table(summary: dict) -> str:
    lines = [f"{summary['payload']}: {summary['vcpus']} vCPU(s), {summary['pages']} data pages, "
             f"{summary['iterations']} iteration(s), {summary['collect']} collection"]
    by_iter: dict = {}
    for run in summary["runs"]:
        keys = collection_keys([it["iteration"] for it in run["iterations"]])
        for key, it in zip(keys, run["iterations"]):
            by_iter.setdefault(key, []).append((run, it))
    # a tag may be up to 10 digits (and "#2"): the column grows rather than shift the rest
    w = max([5] + [len(str(k)) for k in by_iter])
    head = (f"{'iter':>{w}}  {'tracker':7} {'vCPU':>4} {'reported':>8} {'expected':>8} "
            f"{'missed':>6} {'extra':>6} {'dups':>5} {'ring-full':>9} {'reset':>5} "
            f"{'collect':>10}")
    lines.append(head)
    for key in collection_order(summary["runs"]):
        for run, it in by_iter[key]:
            for n, row in enumerate(it["vcpus"]):
                first = n == 0
                exp = "-" if row["expected"] is None else row["expected"]
                lines.append(
                    f"{key if first else '':>{w}}  {run['tracker'] if first else '':7} "
                    f"{row['vcpu']:>4} {row['reported']:>8} {exp:>8} {row['missed']:>6} "
                    f"{row['extra']:>6} {it['duplicates'] if first else '':>5} "
                    f"{it['ring_full_exits'] if first else '':>9} "
                    f"{('ok' if it['reset_count_ok'] else 'BAD') if first else '':>5} "
                    f"{(format(it['collect_s'] * 1000, '.2f') + ' ms') if first else '':>10}")
            sys_pages = it["pages"].get("system")
            if sys_pages:
                lines.append(f"{'':>{w}}  {'':7} system slot pages also reported (stacks, "
                             f"tables): {sys_pages[:8]}{' ...' if len(sys_pages) > 8 else ''}")
            for why in it["lost"]:
                lines.append(f"{'':>{w}}  LOST: {why}")
            if it["missed"]:
                lines.append(f"{'':>{w}}  MISSED pages: {it['missed_pages'][:16]}")
    lines.append(verdict(summary))
    return "\n".join(lines)


RING_WIDTH = 64


def ring_strip(flags, fetch: int, width: int = RING_WIDTH) -> tuple:
    """One line per ring: each character stands for entries/width consecutive positions:
    'D' some entry DIRTY, 'R' some harvested (RESET), '.' all empty; and a marker line
    with '^' under the VMM's fetch index."""
    import numpy as np
    f = np.asarray(flags) & 3
    n = len(f)
    width = min(width, n)
    cells = f.reshape(width, n // width)
    line = "".join("D" if (c == 1).any() else "R" if (c & 2).any() else "." for c in cells)
    mark = [" "] * width
    mark[(fetch % n) // (n // width)] = "^"
    return line, "".join(mark)


def ring_view_text(records, entries_note: str = "") -> str:
    """The rings around each collection: before harvest, after harvest, after reset."""
    out = []
    for key, r in zip(collection_keys([r.iteration for r in records]), records):
        views = r.collection.ring_views
        if not views:
            continue
        out.append(f"iteration {key}:")
        for i, v in views.items():
            n = v["entries"]
            out.append(f"  vCPU {i} ring ({n} entries, {n // min(RING_WIDTH, n)} per char; "
                       f"D dirty, R harvested/RESET, . empty, ^ fetch index)")
            for label, flags, fetch in (("before harvest", v["before"], v["fetch_before"]),
                                        ("after harvest", v["harvested_flags"], v["fetch_after"]),
                                        ("after reset", v["after_reset"], v["fetch_after"])):
                line, mark = ring_strip(flags, fetch)
                out.append(f"    {label:15} |{line}|")
                out.append(f"    {'':15}  {mark}")
            out.append(f"    harvested {v['harvested']} entries (fetch {v['fetch_before']} -> "
                       f"{v['fetch_after']}); KVM_RESET_DIRTY_RINGS returned "
                       f"{v['reset_returned']} for the whole VM")
    return "\n".join(out)


def plot_rings(records, path: str) -> None:
    """A picture of the ring view: one row per stage and collection, one column per entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    rows, labels = [], []
    for name, r in zip(collection_keys([r.iteration for r in records]), records):
        for i, v in (r.collection.ring_views or {}).items():
            for stage, key in (("before", "before"), ("harvested", "harvested_flags"),
                               ("reset", "after_reset")):
                f = np.asarray(v[key]) & 3
                rows.append(np.where(f == 1, 1, np.where(f & 2, 2, 0)))
                labels.append(f"it {name} vCPU {i} {stage}")
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rows) + 1.5), dpi=110)
    ax.imshow(np.array(rows), aspect="auto", interpolation="nearest",
              cmap=ListedColormap(["#eeeeee", "tab:red", "tab:blue"]), vmin=0, vmax=2)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("ring position (red: DIRTY, blue: harvested/RESET, grey: empty)")
    ax.set_title("dirty rings around each collection")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def save(fig, path: str) -> None:
    """The figure as a PNG at ``path``, whatever its name: matplotlib took the format from
    the extension and, for none (".png" is a name, not an extension), wrote ".png.png".
    Written beside ``path`` and renamed over it, so that a failure (a full disk) leaves an
    earlier picture whole, not truncated; in place where that cannot be (a device, a
    directory that takes no new file)."""
    import errno
    import os
    import stat
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    real = os.path.realpath(path)      # a symlink's target is replaced, as open() writes it
    # the name cut short (50 characters, 200 bytes at most): a 255-byte target's own
    # left no room around it
    tmp = os.path.join(os.path.dirname(real), f".{os.path.basename(real)[:50]}."
                                              f"{os.getpid()}.tmp")
    fd = None
    if st is None or stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                raise
    if fd is None:
        # in place, as --plot's check opened it: a device or FIFO (a .png link to
        # /dev/null was replaced by a regular file), or a file its directory takes no
        # new file beside (the check passed, the picture failed after the run)
        with open(path, "wb") as f:
            fig.savefig(f, format="png")
        return
    mode = stat.S_IMODE(st.st_mode) if st is not None else None
    path = real
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _end_text(end: dict | None) -> str:
    if not end:
        return "no end recorded"
    if end["reason"] == "exit-port":
        return f"exited with code {end.get('code')}"
    if end["reason"] == "timeout":
        return "stopped by --timeout"
    vector = end.get("vector")
    error = f": {end['error']}" if end.get("error") else ""
    return end["reason"] + (f", vector {vector}" if vector is not None else "") + error


def verdict(summary: dict) -> str:
    runs = summary["runs"]
    names = " and ".join(r["tracker"] for r in runs)
    checked = sum(it["reported"] for r in runs for it in r["iterations"])
    problems = []
    for r in runs:
        missed = sum(it["missed"] for it in r["iterations"])
        if missed:
            problems.append(f"{r['tracker']} missed {missed} page(s)")
        if any(not it["reset_count_ok"] for it in r["iterations"]):
            problems.append(f"{r['tracker']}: KVM_RESET_DIRTY_RINGS count disagreed with the "
                            "harvest")
        lost = [note for it in r["iterations"] for note in it["lost"]]
        if lost:      # an overflow, a reset cut short, entries not DIRTY when copied...
            problems.append(f"{r['tracker']}: pages lost ({lost[0]}"
                            + (f"; {len(lost) - 1} more" if len(lost) > 1 else "") + ")")
        bogus = sum(it["bogus"] for it in r["iterations"])
        if bogus:
            problems.append(f"{r['tracker']}: {bogus} ring entr{'y' if bogus == 1 else 'ies'} "
                            "named no page of a logged slot")
        if not r["vcpus_ok"]:
            bad = [(i, e) for i, e in enumerate(r["vcpu_ends"])
                   if not e or e["reason"] not in OK_ENDS or e.get("code")]
            more = f"; {len(bad) - 1} more vCPU(s) too" if len(bad) > 1 else ""
            # the guest's own failure first, as `run` names it: a vCPU the timeout
            # stopped may only have waited at the barrier for the one that failed
            first = next((b for b in bad if b[1] and b[1]["reason"] not in HOST_STOPS),
                         bad[0]) if bad else None
            problems.append(f"{r['tracker']}: vCPU {first[0]} ended badly "
                            f"({_end_text(first[1])}{more})"
                            if bad else f"{r['tracker']}: a vCPU ended badly")
    compared = f" ({summary['compared']})" if "compared" in summary else ""
    if len(runs) == 2 and not summary["agree"]:
        diffs = summary["differences"]
        guests = sum(1 for d in diffs if d.get("guests_differ"))
        why = (f"; in {guests} of them the guests themselves changed different pages (the "
               "content oracle differs too): they did not run alike (rdtsc, rdrand, timing, "
               "a vCPU stopped early), so that is no evidence against either tracker"
               if guests else "")
        problems.append(f"ring and bitmap disagree on {len(diffs)} iteration(s)" + compared
                        + why)
    if problems:
        return "verdict: FAIL - " + "; ".join(problems)
    agree = (f" agree on every iteration{' compared' + compared if compared else ''};"
             if len(runs) == 2 else ":")
    planned = any(it["expected"] is not None for r in runs for it in r["iterations"])
    oracles = "the content and plan oracles" if planned else "the content oracle"
    # The content oracle reads each page's first 8 bytes only: a payload writing elsewhere
    # in its pages leaves every reported page "extra", and nothing was really checked
    seen = sum(it["reported"] - it["extra"] for r in runs for it in r["iterations"])
    blind = "" if seen or planned or not checked else (
        "; but none of them changed its first 8 bytes, the only ones the content oracle "
        "reads: the payload writes elsewhere in its pages or the same value again, so a "
        "page a tracker missed would not be seen")
    # a payload of the user's that syncs less than asked (or never: one final collection)
    asked = summary.get("iterations") or 0
    # its syncs, not its distinct tags: a tag is the payload's own, and one synced each
    # iteration (`xor eax, eax`) is as many iterations
    syncs = sum(1 for it in runs[0]["iterations"] if it["iteration"] != "final") if runs else 0
    fewer = (f"; the payload synced for {syncs} of the {asked} iteration(s) asked"
             + ("" if syncs else ", so only the final collection was made")
             if runs and syncs < asked else "")
    return (f"verdict: OK - {names}{agree} no page missed ({checked} reported pages checked "
            f"against {oracles}{blind}){fewer}")


def collection_keys(iterations: list) -> list:
    """A label per collection: its iteration, and "#2", "#3"... on later collections with
    the same tag (a payload may sync more than once per iteration)."""
    seen, out = {}, []
    for it in iterations:
        n = seen[it] = seen.get(it, 0) + 1
        out.append(str(it) if n == 1 else f"{it}#{n}")
    return out


def collection_order(runs: list) -> list:
    """The runs' collection keys in the order they were collected, "final" last. Not by
    tag: a payload's tags are its own (3, 1, 1, 2 is a valid sequence of syncs), and
    sorted by tag the rows no longer said what happened when."""
    order: dict = {}
    for run in runs:      # a run cut short has fewer: the other's further ones follow
        order.update(dict.fromkeys(collection_keys([it["iteration"]
                                                    for it in run["iterations"]])))
    return sorted(order, key=lambda k: k == "final")


def plot(summary: dict, path: str, missed: dict | None = None) -> None:
    """Iterations by pages, coloured by which tracker saw each page, misses marked.

    ``missed``: {tracker: {collection key (collection_keys()): every missed page}}; the
    summary's ``missed_pages`` holds only the first 64 of an iteration's misses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    runs = summary["runs"]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    # one column per collection: a payload may sync twice with one tag, and a column per
    # tag drew only the last of them (an empty picture for pages reported before it).
    # Pages as arrays: scatter() turns a list into a masked array element by element
    # (~6 us a page: half a minute of a 262144-page, 50-iteration run)
    sets, its = {}, {}
    for r in runs:
        keys = collection_keys([it["iteration"] for it in r["iterations"]])
        its[r["tracker"]] = list(zip(keys, r["iterations"]))
        sets[r["tracker"]] = {k: np.unique(np.asarray(it["pages"].get("data", []),
                                                      dtype=np.int64))
                              for k, it in its[r["tracker"]]}
    none = np.zeros(0, dtype=np.int64)
    iters = collection_order(runs)
    xpos = {k: i for i, k in enumerate(iters)}
    names = list(sets)
    colours = {"both": "tab:green", names[0]: "tab:blue"}
    if len(names) == 2:
        colours[names[1]] = "tab:orange"
    width = 0.8
    labelled = set()          # each group in the legend once, whichever iteration has it first

    def label(name):
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for k in iters:
        x = xpos[k]
        if len(names) == 2:
            a, b = sets[names[0]].get(k, none), sets[names[1]].get(k, none)
            groups = {"both": np.intersect1d(a, b, assume_unique=True),
                      names[0]: np.setdiff1d(a, b, assume_unique=True),
                      names[1]: np.setdiff1d(b, a, assume_unique=True)}
        else:
            groups = {names[0]: sets[names[0]].get(k, none)}
        for name, ys in groups.items():
            if len(ys):
                ax.scatter(np.full(len(ys), x), ys, s=2, marker="s",
                           color=colours[name], label=label(name))
        for r in runs:
            for key, it in its[r["tracker"]]:
                if key != k:
                    continue
                pages = it["missed_pages"] if missed is None else \
                    missed.get(r["tracker"], {}).get(k, it["missed_pages"])
                if len(pages):
                    ax.scatter(np.full(len(pages), x), np.asarray(pages), s=30,
                               marker="x", color="red", label=label("missed"))
    # a label to every column ran them together past ~40 of them ("1011121314"): every
    # step-th, as many as fit the axis (~80 characters of tick labels)
    step = max(1, -(-len(iters) * (max(map(len, iters), default=1) + 1) // 80))
    ax.set_xticks(range(0, len(iters), step), iters[::step])
    ax.set_xlim(-width, len(iters) - 1 + width)
    ax.set_xlabel("iteration (collection)")
    ax.set_ylabel("data-slot page")
    ax.set_title(f"{summary['payload']}: dirty pages reported per iteration "
                 f"({', '.join(names)}; {summary['collect']})")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        # outside the axes: inside, it hid the pages (and misses) of the last columns'
        # top rows. One marker size for all: markerscale=4 drew the cross past the frame
        legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                           fontsize=8)
        for handle in legend.legend_handles:
            handle.set_sizes([24])
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
