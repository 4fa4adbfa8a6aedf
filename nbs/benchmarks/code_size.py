"""Module and function sizes against an earlier commit, and the library import graph (issue 19).

Run:  .venv/bin/python nbs/benchmarks/code_size.py REV   (from the repository root; REV e.g. b230815)
"""
import ast, re, subprocess, sys
from pathlib import Path
def stats(files):
    rows = {}
    for name, text in files.items():
        tree = ast.parse(text)
        funcs = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        rows[name] = (len(text.splitlines()), max(funcs, key=lambda x: x[1]) if funcs else ("-", 0))
    return rows
def files_at(rev):
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "lowbudget_ft/"], capture_output=True, text=True).stdout.split()
    return {Path(n).stem: subprocess.run(["git", "show", f"{rev}:{n}"], capture_output=True, text=True).stdout
            for n in names if n.endswith(".py") and not n.endswith(("_modidx.py", "__init__.py"))}
now = {p.stem: p.read_text() for p in Path("lowbudget_ft").glob("*.py") if p.stem not in ("_modidx", "__init__")}
before = files_at(sys.argv[1])
b, a = stats(before), stats(now)
print("| module | lines before | lines after | longest function before | after |\n|---|---:|---:|---|---|")
for m in sorted(set(b) | set(a)):
    lb, fb = b.get(m, (0, ("-", 0))); la, fa = a.get(m, (0, ("-", 0)))
    print(f"| {m} | {lb or '—'} | {la or '—'} | {fb[0]} {fb[1]} | {fa[0]} {fa[1]} |")
# import graph (library modules only, module top and inside functions)
print("\nimport graph (after): module -> library modules it imports (top | inside functions)")
for m, text in sorted(now.items()):
    tree = ast.parse(text); top, inner = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and (n.level or n.module.startswith("lowbudget_ft")):
            mod = n.module.split(".")[-1]
            (top if n.col_offset == 0 else inner).add(mod)
    print(f"  {m}: {', '.join(sorted(top)) or '-'}" + (f" | {', '.join(sorted(inner - top))}" if inner - top else ""))
