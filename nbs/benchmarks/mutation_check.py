"""Mutation check (issue 19): break one line of each module's logic in its notebook, run that notebook's tests, and
see that a test fails. The notebooks are not changed: each mutant is a temporary copy beside them (its export cell
removed, so the library is not rewritten), deleted afterwards.

Run:  OMP_NUM_THREADS=1 .venv/bin/python nbs/benchmarks/mutation_check.py [module ...]  (from the repository root)
Prints one row per mutant: module, the line broken, and the first failing check (or SURVIVED).
"""
import json, os, re, subprocess, sys, time
from pathlib import Path

NBS = Path(__file__).resolve().parents[1]

# module: (notebook, the line as it is, the line broken)
MUTANTS = {
    "checkpoints": ("15_checkpoints", "    for p in old[:max(len(old) - (keep or len(old)), 0)]: discard(p)",
                    "    for p in old[:max(len(old) - (keep or len(old)) - 1, 0)]: discard(p)"),
    "loss": ("16_loss", "    keep[:, :-1] = labels[:, 1:] != -100", "    keep[:, :-1] = labels[:, :-1] != -100"),
    "trainer": ("17_trainer", '    if not math.isfinite(loss): self._stop("loss", loss)', "    pass"),
    "measure": ("19_measure", "labels=ids.clone() if answer_tokens is None else answer_labels(ids, answer_tokens))",
                "labels=ids.clone())"),
    "memory": ("06_memory", '"adamw_torch_fused": (2, 4)', '"adamw_torch_fused": (1, 1)'),
    "baseline": ("22_baseline", '    keep = [_normalise(t) not in seen for t in _texts(te, prompt, "prompt")]',
                 '    keep = [t not in seen for t in _texts(te, prompt, "prompt")]'),
    "scoring": ("20_scoring", "    return 1 - sum(lengths) / padded if padded else 0.0", "    return sum(lengths) / padded if padded else 0.0"),
    "models": ("04_models", '    with open(path, "rb") as f: return f.read(4) == b"GGUF"',
               '    with open(path, "rb") as f: return f.read(3) == b"GGU"'),
    "lora": ("08_lora", "lora_alpha=alpha or 2 * rank,", "lora_alpha=2 * rank,"),
    "train": ("18_train", "        if name in MODEL_SETTINGS and v != getattr(trained, name):",
              "        if name in MODEL_SETTINGS and False:"),
    "config": ("13_config", '    if not c.lr > 0: raise SettingError("lr", c.lr, "must be positive, e.g. 2e-4")',
               '    pass'),
    "loading": ("07_loading", "bnb_4bit_use_double_quant=double_quant,", "bnb_4bit_use_double_quant=True,"),
    "tiny": ("03_tiny", "json.dumps([_FORMAT, seed, TINY_CONFIG", "json.dumps([_FORMAT, 0, TINY_CONFIG"),
}

def mutant(module:str, nb:str, old:str, new:str) -> dict:
    src = json.loads((NBS/f"{nb}.ipynb").read_text())
    hits = [c for c in src["cells"] if old in "".join(c["source"])]
    if len(hits) != 1: return dict(module=module, line=old.strip(), result=f"line found {len(hits)} times: update it")
    c = hits[0]; c["source"] = [s for s in "".join(c["source"]).replace(old, new).splitlines(keepends=True)]
    src["cells"] = [c for c in src["cells"] if "nbdev_export()" not in "".join(c["source"])]
    tmp = NBS/f"mutant_{nb}.ipynb"
    tmp.write_text(json.dumps(src))
    t0 = time.time()
    nbdev_test = Path(sys.executable).parent/"nbdev_test"
    try: r = subprocess.run([str(nbdev_test), "--path", str(tmp)], capture_output=True, text=True)
    except OSError: r = None
    finally: tmp.unlink(missing_ok=True)
    out = (r.stdout + r.stderr) if r else ""
    failed = r is not None and r.returncode != 0
    err = [l.strip() for l in out.splitlines() if re.match(r"\s*(AssertionError|\w+Error|Exception)", l)]
    return dict(module=module, notebook=nb, line=old.strip(), broken=new.strip(), caught=failed,
                failing_check=(err[-1][:160] if err else out.strip().splitlines()[-1][:160] if out.strip() else ""),
                seconds=round(time.time() - t0))

if __name__ == "__main__":
    names = sys.argv[1:] or list(MUTANTS)
    rows = []
    for m in names:
        row = mutant(m, *MUTANTS[m]); rows.append(row)
        print(f"{row['module']:12} {'caught' if row.get('caught') else 'SURVIVED'}  {row.get('line')}  ->  "
              f"{row.get('broken')}\n{'':12} {row.get('failing_check', row.get('result'))}", flush=True)
    out = NBS/"benchmarks/results/mutation_check.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    old.update({r["module"]: r for r in rows})
    out.write_text(json.dumps(old, indent=1))
