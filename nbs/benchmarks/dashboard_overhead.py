"""Wall-time overhead of the live dashboard (widget mode) against the same training run without it.

Run:  python nbs/benchmarks/dashboard_overhead.py [--steps 150] [--repeats 4] [--device cpu|cuda]

Both arms train the same tiny Llama (random weights, same seed, same random-length batches with padding) with the
Hugging Face Trainer; only `Trainer.train()` is timed. Runs are interleaved (none, widget, widget, none, ...) so drift
in machine load hits both arms alike, and the medians are compared. Target: overhead <= 3%.

- "none":   the Trainer with its own progress callbacks removed and no token counting (the cheapest possible run).
- "widget": `Dashboard.attach(trainer, mode="widget", show=False)`: the widgets are built and updated on every redraw
            (header and gauges every 0.5 s, the PNG plot every 3 s, the final PNG and summary at the end) but not
            displayed, since a script has no notebook frontend; `attach` also switches on the Trainer's exact count of
            non-padding tokens, so that cost is included.

Two figures are printed. The wall-time overhead (median of the per-pair ratios) is what the target is about, but on a
shared machine run-to-run noise is several percent. The accounted overhead is exact: the time spent inside the
dashboard's callbacks plus the Trainer's token counting, timed in every widget run, as a share of that run.
"""
import argparse, os, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from lowbudget_ft.dashboard import Dashboard


def make_data(n, vocab, seed=0):
    "Random token ids of random lengths 32..256 (so batches need padding)."
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 257, (n,), generator=g).tolist()
    return [dict(input_ids=torch.randint(1, vocab, (l,), generator=g).tolist()) for l in lens]


def collate(batch):
    "Pad to the longest in the batch; labels ignore padding."
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.tensor([b["input_ids"] + [0] * (n - len(b["input_ids"])) for b in batch])
    mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch])
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def timed(f, box):
    "`f`, adding the seconds each call takes to `box[0]`."
    def g(*args, **kwargs):
        t = time.perf_counter()
        try: return f(*args, **kwargs)
        finally: box[0] += time.perf_counter() - t
    return g


def run(arm, steps, device, data, out):
    "Train `steps` steps; return (seconds in train(), dashboard or None, seconds inside the dashboard and token counting)."
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=device == "cpu", seed=0,
                             dataloader_num_workers=0)
    tr = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    dash, inside = None, [0.0]
    if arm == "widget":
        dash = Dashboard.attach(tr, mode="widget", show=False)
        for name in ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_train_end"):
            setattr(dash, name, timed(getattr(dash, name), inside))  # instance attributes shadow the methods
        tr._track_num_input_tokens = timed(tr._track_num_input_tokens, inside)
    else:
        for cb in list(tr.callback_handler.callbacks):
            if isinstance(cb, (PrinterCallback, ProgressCallback)): tr.remove_callback(cb)
    if device == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    tr.train()
    if device == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t, dash, inside[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    out = os.environ.get("TMPDIR", "/tmp") + "/lbft_dashboard_bench"
    data = make_data(a.steps * 8, 2048)
    print(f"device={a.device} torch threads={torch.get_num_threads()} steps={a.steps} repeats={a.repeats}")
    run("none", 5, a.device, data, out)  # warm-up: imports, allocator, kernels
    run("widget", 5, a.device, data, out)
    times, shares, dash = dict(none=[], widget=[]), [], None
    for i in range(a.repeats):
        for arm in (("none", "widget") if i % 2 == 0 else ("widget", "none")):
            s, d, inside = run(arm, a.steps, a.device, data, out)
            times[arm].append(s)
            dash = d or dash
            if d: shares.append(inside / s)
            extra = (f"  redraws: text={d.renders['text']} plot={d.renders['plot']}, "
                     f"inside dashboard + token count {inside:.2f} s ({100 * inside / s:.1f}%)") if d else ""
            print(f"repeat {i} {arm:>6}: {s:7.2f} s  ({a.steps / s:6.1f} steps/s){extra}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = [w / n - 1 for n, w in zip(times["none"], times["widget"])]
    t = time.perf_counter(); dash._render(); png_s = time.perf_counter() - t
    print(f"\nmedian none  : {med['none']:.2f} s")
    print(f"median widget: {med['widget']:.2f} s")
    print(f"overhead     : {100 * statistics.median(pairs):+.1f}% median of the {len(pairs)} paired runs "
          f"(pairs: {', '.join(f'{100 * x:+.1f}%' for x in pairs)}); medians of the arms {100 * (med['widget'] / med['none'] - 1):+.1f}%  (target <= 3%)")
    print(f"accounted    : {100 * statistics.median(shares):.1f}% of each widget run spent inside the dashboard's callbacks "
          f"and the Trainer's token counting (median; range {100 * min(shares):.1f}-{100 * max(shares):.1f}%)")
    print(f"per-run min  : none {min(times['none']):.2f} s, widget {min(times['widget']):.2f} s "
          f"({100 * (min(times['widget']) / min(times['none']) - 1):+.1f}%)")
    print(f"one plot render (PNG, {len(dash.history)} rows): {1000 * png_s:.0f} ms; "
          f"tokens/s seen by the dashboard: {dash.history[-1]['tokens_per_s']:,.0f}")


if __name__ == "__main__":
    main()
