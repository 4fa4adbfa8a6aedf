"""Evaluation at real length: SmolLM2-135M-Instruct on 200 held-out rows of the long complaints fixture.

Three ways to label the same rows, before training (adapter off) and after, with one model in memory:
  * old-generate: the path before label scoring: prompts in table order, 32 rows a batch padded to the longest,
    no cut, 16 new tokens, parsed. A full pass takes about an hour here, so it runs on the first --old-rows rows and
    its time is scaled to 200 rows (said so in the output);
  * new-generate: prompts cut as training cut them (max_seq_len), length-sorted batches within a token budget;
  * score: `evaluate_labels(method="score")`, the log-likelihood of every label in one pass per batch.
Printed per arm: wall seconds, rows/s, accuracy, unparsed answers; beside them chance (the majority class of the
training rows) and the TF-IDF + logistic regression baseline on the same rows. Training: `finetune`, 4-bit + LoRA r16.

Run:  OMP_NUM_THREADS=2 .venv/bin/python nbs/benchmarks/eval_throughput.py [--steps 30] [--rows 200] [--old-rows 32]
      [--out nbs/benchmarks/results/eval_throughput_cpu]   (writes OUT.txt and OUT.json)
"""
import argparse, json, tempfile, time
from pathlib import Path
import torch
from lowbudget_ft.models import model_path
from lowbudget_ft.loading import load_model
from lowbudget_ft.lora import add_lora
from lowbudget_ft.complaints import load_complaints, LONG_CATEGORIES
from lowbudget_ft.data import format_prompt, encode_prompt
from lowbudget_ft.evaluate import evaluate_labels, parse_label
from lowbudget_ft.baseline import baseline_report, majority_rate
from lowbudget_ft.train import finetune

LINES = []
def say(*a):
    s = " ".join(str(x) for x in a); print(s, flush=True); LINES.append(s)

def old_generate(model, tok, prompts, instruction, max_new_tokens=16, batch_size=32) -> list:
    "The generate path before this change (reference only): table order, padded to the longest, no cut."
    ids = [encode_prompt(format_prompt(p, tok, instruction=instruction), tok) for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    model.eval(); out = []
    try:
        for i in range(0, len(ids), batch_size):
            b = tok.pad({"input_ids": ids[i:i + batch_size]}, return_tensors="pt")
            with torch.no_grad():
                g = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
            out += [a.strip() for a in tok.batch_decode(g[:, b["input_ids"].shape[1]:], skip_special_tokens=True)]
    finally: tok.padding_side = side
    return out

def arms(model, tok, test, cfg, old_rows:int, when:str) -> dict:
    res, truth = {}, list(test.category)
    t = time.time()
    answers = old_generate(model, tok, list(test.complaint[:old_rows]), cfg.instruction)
    secs = time.time() - t
    pred = [parse_label(a, LONG_CATEGORIES) for a in answers]
    res["old-generate"] = dict(seconds_200=secs / old_rows * len(test), rows=old_rows, measured_seconds=secs,
                               accuracy=sum(p == t for p, t in zip(pred, truth)) / old_rows,
                               unparsed=sum(p is None for p in pred))
    for name, method in (("new-generate", "generate"), ("score", "score")):
        t = time.time()
        r = evaluate_labels(model, tok, test, labels=LONG_CATEGORIES, config=cfg, method=method, max_new_tokens=24,
                            progress="console")
        res[name] = dict(seconds_200=time.time() - t, rows=len(test), accuracy=r.accuracy, unparsed=r.unparsed,
                         predicted=r.predicted)
        if method == "score": res[name]["routing"] = r.routing_line()
    g, s = res["new-generate"]["predicted"], res["score"]["predicted"]
    res["agreement"] = sum(a == b for a, b in zip(g, s)) / len(s)
    for k in ("old-generate", "new-generate", "score"):
        x = res[k]
        say(f"{when:6} {k:13} {x['seconds_200']:7.0f} s / {len(test)} rows ({len(test) / x['seconds_200']:.2f} rows/s)"
            f"  accuracy {x['accuracy']:.1%}  unparsed {x['unparsed']}"
            + (f"  (measured on {x['rows']} rows in {x['measured_seconds']:.0f} s, scaled)" if k == "old-generate" else ""))
    say(f"{when:6} score vs new-generate: same label on {res['agreement']:.1%} of rows; {res['score']['routing']}")
    return res

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30); p.add_argument("--rows", type=int, default=200)
    p.add_argument("--old-rows", type=int, default=32); p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--out", default="nbs/benchmarks/results/eval_throughput_cpu")
    a = p.parse_args()
    train, test = load_complaints("train", long=True), load_complaints("test", long=True).head(a.rows)
    chars = test.complaint.str.len()
    say(f"long fixture: {len(train)} training rows, {len(test)} held-out rows; held-out characters median "
        f"{chars.median():.0f}, mean {chars.mean():.0f}, max {chars.max()}; {len(LONG_CATEGORIES)} labels; "
        f"threads {torch.get_num_threads()}")
    t = time.time(); base = baseline_report(train, test, labels=LONG_CATEGORIES)
    say(f"chance (training majority class) {majority_rate(train, test):.1%}; baseline TF-IDF + logistic regression "
        f"{base.accuracy:.1%} ({time.time() - t:.1f} s); {base.routing_line()}")
    instruction = f"Answer with one of these categories only: {'; '.join(LONG_CATEGORIES)}."
    model, tok = load_model(model_path("smollm2"), bits=4, check_fit=False)
    model = add_lora(model, rank=16)
    out = Path(tempfile.mkdtemp())
    from lowbudget_ft.config import RunConfig
    cfg = RunConfig(instruction=instruction, max_seq_len=a.max_seq_len, max_steps=a.steps, batch_size=8, grad_accum=1,
                    lr=1e-3, warmup_ratio=0.1, output_dir=str(out/"run"), dashboard="console", save_every=10_000,
                    logging_steps=max(1, a.steps // 5), save_minutes=0)
    results = dict(rows=len(test), steps=a.steps, max_seq_len=a.max_seq_len, threads=torch.get_num_threads())
    with model.disable_adapter(): results["before"] = arms(model, tok, test, cfg, a.old_rows, "before")
    t = time.time(); res = finetune(model, tok, train[["complaint", "category"]], config=cfg)
    say(f"training: {res.steps} steps x 8 rows in {time.time() - t:.0f} s, mean loss {res.train_loss:.3f}")
    results["train_seconds"] = time.time() - t
    results["after"] = arms(model, tok, test, cfg, a.old_rows, "after")
    results.update(chance=majority_rate(train, test), baseline=base.accuracy)
    for w in ("before", "after"):
        r = results[w]
        say(f"{w}: score {r['old-generate']['seconds_200'] / r['score']['seconds_200']:.1f}x faster than old-generate, "
            f"new-generate {r['old-generate']['seconds_200'] / r['new-generate']['seconds_200']:.1f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".txt").write_text("\n".join(LINES) + "\n")
    for w in ("before", "after"):
        for k in ("new-generate", "score"): results[w][k].pop("predicted")
    Path(a.out + ".json").write_text(json.dumps(results, indent=2))

if __name__ == "__main__": main()
