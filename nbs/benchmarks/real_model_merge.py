"""The QLoRA merge on a real LLM: does the merged model answer as the trained one does?

SmolLM2-135M-Instruct (the offline `smollm2` model) in 4-bit NF4 + LoRA r16 on every linear layer, trained with
`finetune` on the bundled complaints ('complaint' -> 'category', one instruction listing the six categories).
Then, on held-out rows, side by side:
  * accuracy before (adapter off) and after training (4-bit base + adapter: the trained model);
  * `merge_and_save` default (into the NF4 base as training saw it, dequantised) against the trained model:
    same label on how many prompts, max logit difference, accuracy;
  * the same for a merge into the original 16-bit weights (`into="original"`, the QLoRA merge pitfall);
  * GGUF q8_0 (`export_gguf` of the merged folder) answered by llama.cpp against the merged model (`verify_gguf`),
    and the Modelfile;
  * optionally (--speed): one training step with fp32 compute against bf16 compute under `torch.autocast`.

Run:  OMP_NUM_THREADS=2 .venv/bin/python nbs/benchmarks/real_model_merge.py [--steps 30] [--batch-size 8] [--eval-rows 60]
      [--speed] [--out nbs/benchmarks/results/real_model_merge_cpu]   (writes OUT.txt and OUT.json)
"""
import argparse, json, os, shutil, sys, tempfile, time, warnings
from pathlib import Path
import torch
from lowbudget_ft.models import model_path
from lowbudget_ft.loading import load_model
from lowbudget_ft.lora import add_lora
from lowbudget_ft.complaints import load_complaints, CATEGORIES
from lowbudget_ft.train import finetune
from lowbudget_ft.evaluate import evaluate_labels, generate, parse_label
from lowbudget_ft.export import merge_and_save
from lowbudget_ft.data import format_prompt
from lowbudget_ft.core import free_memory

INSTRUCTION = f"Classify this bank complaint into one of these categories: {', '.join(CATEGORIES)}. Answer with the category only."
LINES = []

def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True); LINES.append(s)

def agreement(a:list, b:list) -> float: return sum(x == y for x, y in zip(a, b)) / len(a)

def labels_of(model, tok, prompts) -> list:
    return [parse_label(x, CATEGORIES) for x in generate(model, tok, prompts, instruction=INSTRUCTION, max_new_tokens=16, batch_size=32)]

def step_time(bits_dtype, autocast:bool, batch, repeats:int) -> tuple:
    "Seconds per training step (forward + backward) of 4-bit + LoRA r16 with this compute dtype; and the loss."
    model, _ = load_model(model_path("smollm2"), bits=4, dtype=bits_dtype, check_fit=False)
    model = add_lora(model, rank=16)
    model.train()
    times, loss = [], None
    for i in range(repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if i: times.append(time.perf_counter() - t)  # the first step warms up
        loss = float(out.loss)
    del model; free_memory()
    return min(times), loss

def write(out, R):
    out = Path(out); out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    out.with_suffix(".json").write_text(json.dumps(R, indent=2, default=str))

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30); p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=60); p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4); p.add_argument("--speed", action="store_true")
    p.add_argument("--no-gguf", action="store_true"); p.add_argument("--out", default="nbs/benchmarks/results/real_model_merge_cpu")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    t0, R = time.time(), {}
    work = Path(tempfile.mkdtemp(prefix="real-model-merge-"))
    base = model_path("smollm2")
    train, test = load_complaints("train"), load_complaints("test").head(a.eval_rows)
    prompts, truth = list(test.complaint), list(test.category)
    say(f"# real_model_merge: SmolLM2-135M-Instruct, 4-bit NF4 + LoRA r{a.rank} all-linear, {a.steps} steps x batch {a.batch_size}, "
        f"{len(prompts)} held-out rows, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs")
    say(f"instruction: {INSTRUCTION}")
    model, tok = load_model(base, bits=4)
    model = add_lora(model, rank=a.rank)
    with model.disable_adapter(): before = evaluate_labels(model, tok, test, labels=CATEGORIES, instruction=INSTRUCTION, max_new_tokens=16,
                                                                   method="generate")
    say(f"accuracy before training (adapter off): {before.accuracy:.1%} ({before.unparsed} unparsed); e.g. {before.answers[0]!r}")
    t = time.time()
    res = finetune(model, tok, train[["complaint", "category"]], max_steps=a.steps, batch_size=a.batch_size, grad_accum=1, lr=a.lr,
                   instruction=INSTRUCTION, output_dir=str(work/"run"), dashboard="console", logging_steps=5, save_every=10_000, save_minutes=0)
    losses = [r["loss"] for r in res.history if r.get("loss") is not None]
    say(f"training: {res.steps} steps in {time.time() - t:.0f} s ({(time.time() - t) / res.steps:.1f} s/step), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    after = evaluate_labels(model, tok, test, labels=CATEGORIES, instruction=INSTRUCTION, max_new_tokens=16,
                                                                   method="generate")
    trained = after.predicted
    say(f"accuracy after training (4-bit base + adapter, the trained model): {after.accuracy:.1%} ({after.unparsed} unparsed)")
    R.update(steps=res.steps, batch_size=a.batch_size, eval_rows=len(prompts), loss_first=losses[0], loss_last=losses[-1],
             accuracy_before=before.accuracy, accuracy_trained=after.accuracy, train_seconds=res.seconds)
    del model; free_memory()

    for into in ("trained", "original"):
        t = time.time()
        rep = merge_and_save(res.adapter_path, work/f"merged-{into}", into=into, labels=CATEGORIES, prompts=prompts)
        from transformers import AutoModelForCausalLM
        merged = AutoModelForCausalLM.from_pretrained(work/f"merged-{into}", dtype=torch.float32).eval()
        got = labels_of(merged, tok, prompts)
        acc = sum(g == t_ for g, t_ in zip(got, truth)) / len(truth)
        agree = agreement(got, trained)
        del merged; free_memory()
        say(f"merge into={into!r} ({time.time() - t:.0f} s): {rep.summary()}")
        say(f"   re-measured: same label as the trained model on {agree:.1%} of {len(prompts)} prompts; accuracy {acc:.1%} (trained {after.accuracy:.1%})")
        R[f"merge_{into}"] = dict(ok=rep.ok, max_logit_diff=rep.max_diff, tol=rep.tol, check_label_agreement=rep.label_agreement,
                                  label_agreement_with_trained=agree, accuracy=acc, notes=rep.notes)

    if not a.no_gguf:
        from lowbudget_ft.gguf import export_gguf, verify_gguf, _prompt_text
        t = time.time()
        g = export_gguf(work/"merged-trained", work/"gguf", "q8_0")
        say(f"GGUF q8_0: {g.name}, {g.stat().st_size / 1e6:.0f} MB in {time.time() - t:.0f} s")
        contents = [f"{INSTRUCTION}\n\n{p.strip()}" for p in prompts]  # the user turn exactly as format_prompt builds it
        assert _prompt_text(tok, contents[0], True) == format_prompt(prompts[0], tok, instruction=INSTRUCTION), "GGUF prompt differs from training's"
        chk = verify_gguf(g, work/"merged-trained", contents, labels=CATEGORIES, max_new_tokens=16)
        gl = [parse_label(x, CATEGORIES) for x in chk.gguf]
        gacc = sum(x == y for x, y in zip(gl, truth)) / len(truth)
        say(f"{chk.summary()}; GGUF accuracy {gacc:.1%}; same label as the trained model on {agreement(gl, trained):.1%}")
        say("Modelfile:\n" + (g.parent/"Modelfile").read_text())
        R["gguf_q8_0"] = dict(label_agreement=chk.label_agreement, identical=chk.agreement, prompt_tokens_identical=chk.token_agreement,
                              accuracy=gacc, label_agreement_with_trained=agreement(gl, trained), modelfile=(g.parent/"Modelfile").read_text())

    write(a.out, R)
    if a.speed:
      try:
        from lowbudget_ft.data import prepare_dataset, make_collator
        ds = prepare_dataset(train.head(a.batch_size), tok, instruction=INSTRUCTION)
        batch = make_collator(tok, packing=False)([ds[i] for i in range(a.batch_size)])
        n = int(batch["attention_mask"].sum())
        f32, l32 = step_time(torch.float32, False, batch, 3)
        b16, l16 = step_time(torch.bfloat16, True, batch, 3)
        say(f"one training step, batch {a.batch_size} ({n} tokens, dynamic padding): fp32 compute {f32:.2f} s (loss {l32:.3f}), "
            f"bf16 compute + autocast {b16:.2f} s (loss {l16:.3f}): {f32 / b16:.2f}x")
        R["speed"] = dict(tokens=n, fp32_s=f32, bf16_autocast_s=b16, ratio=f32 / b16, loss_fp32=l32, loss_bf16=l16)
      except Exception as e: say(f"speed step not measured: {type(e).__name__}: {e}")
    R["wall_seconds"] = round(time.time() - t0)
    say(f"total {R['wall_seconds']} s")
    write(a.out, R)
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__": main()
