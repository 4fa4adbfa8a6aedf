"""Fail when a notebook's test cell holds an import beside other code.

nbdev's docs processing runs every cell that contains an import (to render `show_doc`), so such a cell runs there
without the setup of the cells above it: the docs step fails or runs a test. Keep imports in import-only cells.
Run: .venv/bin/python .ci/import_cells.py   (exit 1 and one line per cell when there is one)
"""
import ast, json, sys
from pathlib import Path

def _code(src:str) -> str: return "\n".join(l for l in src.split("\n") if not l.lstrip().startswith(("%", "!")))

def mixed_cells(nb_path:Path) -> list:
    "Indices of `nb_path`'s code cells (not exported, evaluated) that hold an import and other statements."
    out = []
    for i, c in enumerate(json.loads(nb_path.read_text())["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] != "code" or src.lstrip().startswith("#| export") or "nbdev_export()" in src: continue
        if "#| eval: false" in src: continue
        try: tree = ast.parse(_code(src))
        except SyntaxError: continue
        nodes = list(ast.walk(tree))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and \
           any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes): out.append(i)
    return out

if __name__ == "__main__":
    bad = [(p, i) for p in sorted(Path("nbs").rglob("*.ipynb")) if "_proc" not in p.parts for i in mixed_cells(p)]
    for p, i in bad: print(f"{p}: cell {i} holds an import beside other code: move the import to an import-only cell "
                           "above (nbdev's docs processing runs every cell with an import)")
    sys.exit(1 if bad else 0)
