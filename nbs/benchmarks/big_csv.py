"""A ~50 MB CSV through `prepare_dataset`: peak memory and time to the first line shown, before and after.

The CSV is built from the long complaints generator (`make_long_complaints`, several seeds, ids renumbered) and kept
in a temporary folder (or `--csv`). Each variant runs in a fresh Python process, so peak RSS is its own:
  * before: the package as it was at `--before` (default 6d4d452, the commit before this work), exported with
    `git archive` into a temporary folder and put first on PYTHONPATH;
  * after: the package in this working tree.
Each child loads the tokenizer, then calls `prepare_dataset(csv, tok, max_seq_len=512)` (complaint -> category).
Measured per variant: peak RSS of the whole process (ru_maxrss), RSS before the call (imports + tokenizer), wall
time of the call, and the seconds from the call's start to the first byte it wrote to stdout/stderr, with that
first line.

Run:  python nbs/benchmarks/big_csv.py [--mb 50] [--tokenizer smollm2|tiny] [--csv big.csv] [--only before|after]
                                      [--train-helpers] [--out nbs/benchmarks/results/big_csv.json]
`--train-helpers` also runs what `finetune` does next with the examples (train's `_fingerprint` and
`_answer_tokens`, which read every example into Python lists), to show the memory that is left outside the data layer.
"""
import argparse, json, os, select, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

def build_csv(path:Path, mb:float) -> dict:
    "Write long complaints (seeds 0, 1, ...) to `path` until it holds `mb` MB; returns rows and size."
    from lowbudget_ft.long_complaints import make_long_complaints
    import pandas as pd
    frames, size, seed = [], 0, 0
    while size < mb * 1e6:
        df = make_long_complaints(5000, seed=seed)
        frames.append(df); size += df["complaint"].str.len().sum() + df["category"].str.len().sum(); seed += 1
    df = pd.concat(frames, ignore_index=True).assign(id=lambda d: range(len(d)))
    df.to_csv(path, index=False, lineterminator="\n")
    return {"rows": len(df), "bytes": path.stat().st_size, "seeds": seed}

def tokenizer(kind:str):
    "The tokenizer to prepare with: SmolLM2's (from the installed GGUF, tokenizer only) or the tiny model's."
    from transformers import AutoTokenizer
    if kind == "tiny":
        from lowbudget_ft.tiny import tiny_model_path
        return AutoTokenizer.from_pretrained(tiny_model_path())
    from lowbudget_ft.models import smollm2_gguf
    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)

def child(csv:str, kind:str, train_helpers:bool=False):
    ("One measured run (in its own process): prints '@@start', prepares, then '@@result <json>'; `train_helpers`: "
     "then also runs train's fingerprint and answer-length helpers on the examples.")
    import resource, warnings
    from lowbudget_ft.data import prepare_dataset
    tok = tokenizer(kind)
    rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    print("@@start", flush=True)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds = prepare_dataset(csv, tok, prompt="complaint", response="category", max_seq_len=512)
    secs = time.perf_counter() - t
    print(f"prepared {len(ds):,} examples", file=sys.stderr, flush=True)
    res = {"examples": len(ds), "seconds": round(secs, 1), "rss_before_call": rss0,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if train_helpers:  # what `finetune` does next with the examples (train.py, not part of the data layer)
        from lowbudget_ft.train import _fingerprint, _answer_tokens
        t = time.perf_counter(); _fingerprint(ds); _answer_tokens(ds)
        res |= {"train_helpers_seconds": round(time.perf_counter() - t, 1),
                "peak_rss_with_train_helpers": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("@@result " + json.dumps(res), flush=True)

def measure(pythonpath:str, csv:str, kind:str, train_helpers:bool=False) -> dict:
    "Run `child` with `pythonpath` first; time the first output after '@@start'."
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, __file__, "--child", csv, "--tokenizer", kind]
                         + ["--train-helpers"] * train_helpers, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    buf, t0, first, first_s = b"", None, None, None
    while True:
        if not select.select([p.stdout], [], [], 1.0)[0]:
            if p.poll() is not None: break
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk: break
        now = time.perf_counter()
        buf += chunk
        if t0 is None and b"@@start\n" in buf: t0, buf = now, buf.split(b"@@start\n", 1)[1]; continue
        if t0 is not None and first is None and buf.strip():
            first_s, first = now - t0, buf.decode(errors="replace").replace("\r", "\n").strip().splitlines()[0]
    p.wait()
    out = buf.decode(errors="replace")
    res = json.loads(out.split("@@result ", 1)[1].splitlines()[0]) if "@@result " in out else {"error": out[-2000:]}
    return {**res, "first_output_s": None if first_s is None else round(first_s, 1), "first_output": first}

def main():
    a = argparse.ArgumentParser()
    a.add_argument("--mb", type=float, default=50); a.add_argument("--tokenizer", default="smollm2")
    a.add_argument("--before", default="6d4d452"); a.add_argument("--csv"); a.add_argument("--child")
    a.add_argument("--out", default=str(ROOT / "nbs/benchmarks/results/big_csv.json"))
    a.add_argument("--train-helpers", action="store_true", help="also time train's _fingerprint/_answer_tokens")
    a.add_argument("--only", choices=["before", "after"], help="measure one variant only")
    a = a.parse_args()
    if a.child: return child(a.child, a.tokenizer, a.train_helpers)
    with tempfile.TemporaryDirectory() as d:
        csv = Path(a.csv or Path(d) / "big.csv")
        info = build_csv(csv, a.mb) if not csv.exists() else {"bytes": csv.stat().st_size}
        print(f"{csv.name}: {info}", flush=True)
        old = Path(d) / "before"; old.mkdir()
        subprocess.run(f"git -C {ROOT} archive {a.before} lowbudget_ft | tar -x -C {old}", shell=True, check=True)
        head = lambda: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
        res = {"csv": info, "tokenizer": a.tokenizer, "before_commit": a.before}
        for name, path in (("before", str(old)), ("after", str(ROOT))):
            if a.only and name != a.only: continue
            if name == "after": res["after_commit"] = head()  # HEAD when the after run starts (the tree it imports)
            res[name] = measure(path, str(csv), a.tokenizer, a.train_helpers)
            print(name, res[name], flush=True)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    for k in ("before", "after"):
        r = res.get(k, {})
        if "peak_rss" not in r: continue
        print(f"{k:6}: peak RSS {gib(r['peak_rss'])} (imports + tokenizer {gib(r['rss_before_call'])}), "
              f"{r['seconds']} s, first output after {r['first_output_s']} s: {r['first_output']!r}")
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")

if __name__ == "__main__": main()
