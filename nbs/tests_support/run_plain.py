"""Run a notebook's code cells with plain Python, top to bottom, in one namespace: the check that a page runs on a
plain `pip install lowbudget_ft` (no Jupyter, no nbdev, no fastcore).

    python nbs/tests_support/run_plain.py nbs/tutorials/complaints_walkthrough.ipynb [more.ipynb ...]

Cells marked `#| eval: false` are skipped (Colab-only and GPU-only cells), as nbdev_test skips them; `!` shell lines
are skipped; everything else runs as written, hidden cells included, with the notebook's folder as the working
directory. Exits 1 at the first failing cell, naming it. Uses only the standard library and what the notebook imports.
"""
import json, os, sys, time, traceback
from pathlib import Path


def cells(nb_path):
    "The code cells to run: (index, source) without `#|` lines, `#| eval: false` cells left out."
    for i, c in enumerate(json.loads(Path(nb_path).read_text(encoding="utf-8"))["cells"]):
        if c["cell_type"] != "code": continue
        src = "".join(c["source"])
        flags = [l.replace(" ", "") for l in src.splitlines() if l.startswith("#|")]
        if "#|eval:false" in flags: continue
        yield i, "\n".join(l for l in src.splitlines() if not l.startswith(("#|", "!")))


def run(nb_path):
    "Run one notebook; True when every cell ran."
    nb_path, here, ns, t0 = Path(nb_path).resolve(), os.getcwd(), {"__name__": "__main__"}, time.time()
    os.chdir(nb_path.parent)
    try:
        for i, src in cells(nb_path):
            try: exec(compile(src, f"{nb_path.name} cell {i}", "exec"), ns)
            except Exception:
                traceback.print_exc()
                print(f"FAILED {nb_path.name}: cell {i}", file=sys.stderr)
                return False
    finally: os.chdir(here)
    print(f"ok {nb_path.name} ({time.time() - t0:.0f} s)")
    return True


if __name__ == "__main__":
    sys.exit(0 if all([run(p) for p in sys.argv[1:]]) else 1)
