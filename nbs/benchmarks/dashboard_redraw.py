"""Cost of one live chart redraw: a full redraw of the kept figure (before) against a blitted frame (after).

Run:  python nbs/benchmarks/dashboard_redraw.py [--repeats 20]

Before: `Plotter.render(rows, dpi=100)`, what every live frame cost until the chart redrew on each logged loss: the
kept figure drawn in full (axes, ticks, legends, lines) and saved as PNG. After: `Plotter.render(rows, live=True)` with
one more point than the last frame, the loss still inside the panel: the saved background restored, the lines drawn
over it, the canvas encoded as PNG. Both are timed interleaved, in one process, on the same rows; medians are printed
side by side. A live frame whose background must be drawn again (a new line, the loss out of range) costs about the
"before" figure; the dashboard's throttle keeps all chart drawing under 1% of the run's time either way.
"""
import argparse, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from lowbudget_ft.dashboard import Plotter

GiB = 2**30


def rows(n):
    "A falling loss and slowly growing memory, as a run logs them."
    return [dict(step=s, loss=3 - s / (2 * n), allocated=(1 + s / (10 * n)) * GiB, reserved=1.5 * GiB, peak=2 * GiB)
            for s in range(1, n + 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    print(f"{'rows':>6} {'before (full redraw)':>22} {'after (blitted frame)':>23} {'ratio':>7}")
    for n in (20, 120, 1000):
        data, before, after = rows(n + a.repeats + 1), [], []
        full, live = Plotter(), Plotter()
        full.render(data[:n], gpu_limit=15 * GiB, dpi=100)
        live.render(data[:n], gpu_limit=15 * GiB, max_steps=len(data), live=True)
        draws = live.full_draws
        for i in range(a.repeats):
            t = time.perf_counter(); full.render(data[:n + i + 1], gpu_limit=15 * GiB, dpi=100)
            before.append(time.perf_counter() - t)
            t = time.perf_counter(); live.render(data[:n + i + 1], gpu_limit=15 * GiB, max_steps=len(data), live=True)
            after.append(time.perf_counter() - t)
        b, f = statistics.median(before), statistics.median(after)
        print(f"{n:>6} {1000 * b:>19.1f} ms {1000 * f:>20.1f} ms {b / f:>6.1f}x"
              f"   (backgrounds redrawn in the {a.repeats} live frames: {live.full_draws - draws})")


if __name__ == "__main__":
    main()
