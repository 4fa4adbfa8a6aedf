"""Data preparation throughput and padding waste, measured side by side in one run.

On the bundled complaints (1,200 rows) and on 20x that (24,000 rows), with the tiny offline tokenizer:
  * rows tokenised per second by `prepare_dataset` (prompt + answer tokenised apart, labels masked), next to the
    per-row `Dataset.map` that many Colab notebooks use (tokenise prompt+answer, pad to max_seq_len);
  * the share of padding tokens in the batches, and rows collated per second, for
    (a) every example padded to max_seq_len, (b) dynamic padding, (c) padding-free packing.
Batches are drawn in a shuffled order (seed 0), as the Trainer does.

Run:  .venv/bin/python nbs/benchmarks/data_throughput.py [--max-seq-len 512] [--batch-size 8]
"""
import argparse, time, warnings
import numpy as np, pandas as pd
from transformers import AutoTokenizer, DataCollatorForSeq2Seq
import datasets
from lowbudget_ft.complaints import load_complaints
from lowbudget_ft.tiny import tiny_model_path
from lowbudget_ft.data import prepare_dataset, make_collator, format_prompt

INSTR = "Route this complaint to the right team."

def naive_map(df, tok, max_seq_len):
    "The common notebook recipe: one row at a time, prompt+answer in one string, padded to max_seq_len."
    def fn(r):
        enc = tok(format_prompt(r["complaint"], instruction=INSTR) + r["category"] + tok.eos_token,
                  truncation=True, max_length=max_seq_len, padding="max_length")
        enc["labels"] = enc["input_ids"].copy()
        return enc
    return datasets.Dataset.from_pandas(df[["complaint", "category"]]).map(fn, remove_columns=["complaint", "category"])

def timed(f, *a, **k):
    t = time.perf_counter(); r = f(*a, **k); return r, time.perf_counter() - t

def collate_all(ds, collator, batch_size, seed=0):
    "Collate every batch of a shuffled pass; returns (real tokens, padding tokens, seconds)."
    feats = ds.to_list()
    order = np.random.default_rng(seed).permutation(len(feats))
    real = pad = 0
    t = time.perf_counter()
    for s in range(0, len(order), batch_size):
        b = collator([feats[i] for i in order[s:s + batch_size]])
        total = b["input_ids"].numel()
        n_real = int(b["attention_mask"].sum()) if "attention_mask" in b else total
        real += n_real; pad += total - n_real
    return real, pad, time.perf_counter() - t

def main(max_seq_len=512, batch_size=8):
    datasets.disable_progress_bars(); warnings.simplefilter("ignore")
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    base = load_complaints()
    print(f"tiny tokenizer (vocab {len(tok)}), max_seq_len={max_seq_len}, batch_size={batch_size}\n")
    collators = {"(a) pad to max_seq_len": DataCollatorForSeq2Seq(tok, padding="max_length", max_length=max_seq_len),
                 "(b) dynamic padding": make_collator(tok),
                 "(c) packing (flattening)": make_collator(tok, packing=True)}
    for scale in (1, 20):
        df = pd.concat([base] * scale, ignore_index=True)
        ds, t_prep = timed(prepare_dataset, df, tok, "complaint", "category", instruction=INSTR, max_seq_len=max_seq_len)
        _, t_naive = timed(naive_map, df, tok, max_seq_len)
        n = len(df)
        print(f"== {n} rows ({scale}x sample) ==")
        print(f"tokenising: prepare_dataset {n / t_prep:,.0f} rows/s | per-row map, padded {n / t_naive:,.0f} rows/s | ratio {t_naive / t_prep:.1f}x")
        print(f"{'batching':<26} {'padding share':>13} {'tokens/batch':>13} {'rows collated/s':>16}")
        res = {}
        for name, col in collators.items():
            real, pad, t = collate_all(ds, col, batch_size)
            res[name] = (real, pad)
            nb = -(-n // batch_size)
            print(f"{name:<26} {pad / (real + pad):>12.1%} {(real + pad) / nb:>13.0f} {n / t:>16,.0f}")
        (ra, pa), (rb, pb) = res["(a) pad to max_seq_len"], res["(b) dynamic padding"]
        print(f"tokens pushed through the model per real token: (a) {(ra + pa) / ra:.2f}  (b) {(rb + pb) / rb:.2f}  (c) 1.00\n")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-seq-len", type=int, default=512); ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    main(a.max_seq_len, a.batch_size)
