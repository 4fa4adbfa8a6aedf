"""Saved outputs of the documentation notebooks: regenerate them, and notice when they go stale.

  .venv/bin/python .ci/outputs.py --refresh [NB ...]
      execute the notebooks (all of NOTEBOOKS when none is named) in place, as nbdev_test does (cwd = the notebook's
      folder, the same cells skipped), save their outputs, nbdev_clean them, record their code cells in .ci/outputs.json
  .venv/bin/python .ci/outputs.py --check
      no execution: one line per notebook whose saved outputs are stale (a code cell changed since its refresh) or
      cannot be refreshed (outputs in a notebook outside NOTEBOOKS); exit 1 if any
  .venv/bin/python .ci/outputs.py --strip NB ...
      remove every saved output of the notebooks named
"""
import copy, datetime, hashlib, json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT/".ci"/"outputs.json"
REFRESH = ".venv/bin/python .ci/outputs.py --refresh"
# the pages whose outputs are kept and regenerated; any other notebook must have no saved outputs
NOTEBOOKS = ["nbs/tutorials/complaints_walkthrough.ipynb", "nbs/how_to/excel_data.ipynb",
             "nbs/how_to/longest_context.ipynb", "nbs/how_to/multi_gpu.ipynb", "nbs/how_to/resume.ipynb",
             "nbs/how_to/will_it_fit.ipynb", "nbs/06_memory.ipynb", "nbs/21_evaluate.ipynb", "nbs/24_gguf.ipynb",
             "nbs/26_real_model.ipynb",
             # API pages whose examples print or draw something
             "nbs/00_core.ipynb", "nbs/02_complaints.ipynb", "nbs/03_tiny.ipynb", "nbs/07_loading.ipynb",
             "nbs/08_lora.ipynb", "nbs/11_data.ipynb", "nbs/12_attention.ipynb", "nbs/14_dashboard.ipynb",
             "nbs/18_train.ipynb", "nbs/23_export.ipynb", "nbs/25_cli.ipynb"]


def _nb(rel): return json.loads((ROOT/rel).read_text())
def _src(cell): return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
def _code(nb): return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
def _hashes(nb): return [hashlib.sha256(_src(c).encode()).hexdigest()[:16] for _, c in _code(nb)]
def _has_outputs(nb): return any(c.get("outputs") for _, c in _code(nb))
def _rel(p): return Path(p).resolve().relative_to(ROOT).as_posix()
def _all_nbs(): return sorted(_rel(p) for p in (ROOT/"nbs").rglob("*.ipynb")
                              if not any(s.startswith((".", "_")) for s in p.relative_to(ROOT/"nbs").parts))


def stale() -> list:
    "One line per notebook whose saved outputs are stale or not refreshable."
    rec = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    msgs = []
    for rel in _all_nbs():
        nb = _nb(rel)
        if not _has_outputs(nb): continue
        if rel not in NOTEBOOKS:
            msgs.append(f"{rel}: has saved outputs but is not in NOTEBOOKS of .ci/outputs.py, so nothing refreshes "
                        f"them: run .venv/bin/python .ci/outputs.py --strip {rel} (or add it to NOTEBOOKS and refresh)")
            continue
        old, new, code = rec.get(rel, {}).get("cells"), _hashes(nb), _code(nb)
        if old is None:
            msgs.append(f"{rel}: has saved outputs that were never recorded in .ci/outputs.json: run {REFRESH} {rel}")
        elif old != new:
            k = next((k for k, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            n = code[k][0] + 1 if k < len(code) else len(nb["cells"])
            # n counts all cells from 1, as nbdev_test's "While Executing Cell #n"
            msgs.append(f"{rel}: cell {n} changed after its outputs were made: run {REFRESH} {rel}")
    return msgs


def _skip(cell, flags) -> bool:
    "The cells nbdev_test skips: not code, `eval: false`, a test flag of settings.ini, the `nbdev_export()` call."
    from nbdev.process import extract_directives
    if cell.cell_type != "code" or "nbdev_export" + "(" in cell.source: return True
    d = extract_directives(copy.deepcopy(cell), remove=False) or {}
    return d.get("eval:", [""])[0].lower() == "false" or bool(flags & d.keys())


_BAR = re.compile(r"[^\r\n]*\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")  # a tqdm frame: "Loading weights: 100%|###| 21/21 [..]"

def _drop_progress_bars(cell):
    "Drop tqdm progress bars (transformers' 'Loading weights', 'Writing model shards') from stderr: noise on a page."
    if cell.cell_type != "code": return
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stderr":
            lines = "".join(o.text).split("\n")
            o.text = "\n".join(l for l in lines if not all(_BAR.fullmatch(f) for f in l.split("\r") if f.strip())
                               or not l.strip())
    cell.outputs = [o for o in cell.get("outputs", []) if o.get("name") != "stderr" or "".join(o.text).strip()]


def refresh(rel:str):
    "Execute `rel` in place like nbdev_test (in its folder, its flagged cells skipped), then nbdev_clean it."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.clean import nbdev_clean
    path = ROOT/rel
    flags = set(get_config().get("tst_flags", "").split())
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == "code": c.outputs, c.execution_count = [], None
    os.environ["IN_TEST"] = "1"  # as under nbdev_test: load_model hides its progress bars, no sample files rewritten
    k = CaptureShell(path, mpl_format="png")  # png at the figure's own dpi (retina doubles the bytes)
    with working_directory(path.parent):
        try: k.run_all(nb, exc_stop=True, preproc=lambda c: _skip(c, flags))
        except BaseException: sys.exit(f"{rel}: refresh failed, notebook left as it was:\n{k.prettytb(fname=rel)}")
    for c in nb.cells: _drop_progress_bars(c)
    write_nb(nb, path)
    nbdev_clean(str(path))
    for i, c in _code(_nb(rel)):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error" or o.get("name") == "stderr":
                text = "".join(o.get("text", "") or o.get("traceback", ""))
                print(f"  note: {rel} cell {i + 1} shows {o.get('name') or 'an error'}: {text[:200]!r}")


def record(rels):
    rec = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    today = datetime.date.today().isoformat()
    for rel in rels: rec[rel] = dict(date=today, cells=_hashes(_nb(rel)))
    RECORD.write_text(json.dumps(dict(sorted(rec.items())), indent=1) + "\n")


def strip(rel:str):
    nb = _nb(rel)
    for _, c in _code(nb): c["outputs"], c["execution_count"] = [], None
    (ROOT/rel).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    from nbdev.clean import nbdev_clean
    nbdev_clean(str(ROOT/rel))


def main(args):
    if args[:1] == ["--check"] and len(args) == 1:
        msgs = stale()
        for m in msgs: print(m)
        return 1 if msgs else 0
    if args[:1] == ["--one"]: return refresh(args[1])
    if args[:1] in (["--refresh"], ["--strip"]):
        rels = [_rel(a) for a in args[1:]] or (NOTEBOOKS if args[0] == "--refresh" else [])
        if not rels: sys.exit("--strip: name the notebooks to strip")
        for rel in rels:
            if not (ROOT/rel).is_file(): sys.exit(f"{rel}: no such notebook")
            if args[0] == "--refresh" and rel not in NOTEBOOKS:
                sys.exit(f"{rel}: not in NOTEBOOKS of .ci/outputs.py: add it there to keep its outputs")
        os.chdir(ROOT)
        for rel in rels:
            if args[0] == "--strip": strip(rel); continue
            print(f"refreshing {rel}", flush=True)  # one process per notebook, as nbdev_test runs them
            if subprocess.run([sys.executable, __file__, "--one", rel]).returncode: return 1
            record([rel])
        return 0
    sys.exit(__doc__)


if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
