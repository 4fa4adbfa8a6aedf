"""Training throughput: useful (non-padding) tokens per second of three data recipes, side by side in one run.

On the tiny offline model (4-bit NF4 + LoRA r=16, paged 8-bit AdamW, gradient checkpointing — our defaults), one
epoch over the same complaints in the same order, through `finetune`:
  * notebook: the common Colab recipe — every example padded to max_seq_len, no packing;
  * dynamic:  dynamic padding (each batch padded to its longest example);
  * packed:   our default — padding-free packing (`DataCollatorWithFlattening`: one row, position ids restart per
              example) with `packed_attention` (sdpa run example by example inside the row);
  * packed-row: the same packing with transformers' own sdpa path, which masks but still computes attention over the
              whole row (what packing gives on a T4 or a CPU without `packed_attention`).
Useful tokens are the examples' real tokens (identical for the three). Each recipe runs `--repeats` times,
interleaved, and the best time counts (the machine may be shared). Before timing, it checks that packing is
correct: the loss of a packed batch equals the loss of the same examples padded.

Run:  .venv/bin/python nbs/benchmarks/train_throughput.py [--examples 256] [--batch-size 8] [--max-seq-len 512]
"""
import argparse, contextlib, tempfile, time, warnings
import torch, datasets
from lowbudget_ft.tiny import tiny_model_path
from lowbudget_ft.loading import load_model
from lowbudget_ft.lora import add_lora
from lowbudget_ft.complaints import load_complaints
import lowbudget_ft.attention
from lowbudget_ft.data import prepare_dataset, make_collator
from lowbudget_ft.train import finetune
from lowbudget_ft.config import RunConfig

def pad_to_max(ds, pad_id, n):
    "The notebook recipe: every example padded to `n` tokens."
    def f(r):
        k = n - len(r["input_ids"])
        return dict(input_ids=r["input_ids"] + [pad_id] * k, attention_mask=r["attention_mask"] + [0] * k,
                    labels=r["labels"] + [-100] * k)
    return ds.map(f)

def check_packing(model, tok, ds):
    "Loss of 8 examples padded, packed, and packed with `packed_attention`: equal when packing keeps the examples apart."
    feats = ds.select(range(8)).to_list()
    model.eval()
    with torch.no_grad():
        a = model(**make_collator(tok, packing=False)(feats)).loss.item()
        b = model(**make_collator(tok, packing=True)(feats)).loss.item()
        with lowbudget_ft.attention.packed_attention(model):
            c = model(**make_collator(tok, packing=True)(feats)).loss.item()
    model.train()
    return a, b, c

def main(examples=256, batch_size=8, max_seq_len=512, repeats=2, threads=1):
    warnings.simplefilter("ignore"); datasets.disable_progress_bars()
    torch.set_num_threads(threads)
    model, tok = load_model(tiny_model_path())
    model = add_lora(model, rank=16, dropout=0.0)
    ds = prepare_dataset(load_complaints("train").head(examples), tok, prompt="complaint", response="category", max_seq_len=max_seq_len)
    useful = sum(len(x) for x in ds["input_ids"])
    a, b, c = check_packing(model, tok, ds)
    same = lambda x: 'same' if abs(a - x) < 1e-3 * abs(a) else 'DIFFERENT: packing leaks across examples'
    print(f"packing check: loss padded {a:.5f}, packed {b:.5f} ({same(b)}), packed with packed_attention {c:.5f} ({same(c)})")
    recipes = {"notebook": (pad_to_max(ds, tok.pad_token_id, max_seq_len), False), "dynamic": (ds, False),
               "packed": (ds, True), "packed-row": (ds, True)}
    ours = lowbudget_ft.attention.packed_attention
    best = {k: float("inf") for k in recipes}
    for _ in range(repeats):
        for name, (data, packing) in recipes.items():
            # finetune imports packed_attention when it runs: the packed-row arm swaps in a no-op for its run
            lowbudget_ft.attention.packed_attention = ours if name != "packed-row" else (lambda m: contextlib.nullcontext())
            with tempfile.TemporaryDirectory() as out:
                cfg = RunConfig(output_dir=out, batch_size=batch_size, grad_accum=1, epochs=1, packing=packing, max_seq_len=max_seq_len,
                                save_every=10**6, save_minutes=0, logging_steps=10**6, dashboard="quiet")
                t = time.perf_counter(); finetune(model, tok, data, config=cfg); best[name] = min(best[name], time.perf_counter() - t)
    tps = {k: useful / v for k, v in best.items()}
    print(f"{examples} examples, {useful:,} useful tokens, batch {batch_size}, max_seq_len {max_seq_len}, {threads} thread(s), best of {repeats}")
    lowbudget_ft.attention.packed_attention = ours
    for k in recipes: print(f"  {k:<10} {best[k]:7.2f} s  {tps[k]:9,.0f} useful tokens/s")
    print(f"packed vs notebook recipe: {tps['packed'] / tps['notebook']:.2f}x (target >= 2x)")
    print(f"packed vs dynamic padding: {tps['packed'] / tps['dynamic']:.2f}x (target >= 1.2x)")
    print(f"dynamic vs notebook recipe: {tps['dynamic'] / tps['notebook']:.2f}x")
    print(f"packed vs packed-row (what packed_attention adds): {tps['packed'] / tps['packed-row']:.2f}x")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=256); p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512); p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    main(a.examples, a.batch_size, a.max_seq_len, a.repeats, a.threads)
