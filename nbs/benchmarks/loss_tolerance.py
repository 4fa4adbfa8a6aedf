"""Measured spread behind the tolerances of nbs/16_loss.ipynb: answer_loss vs the model's full-logits loss.

For each model, batch and setting it prints the relative loss difference and the largest gradient difference as a
share of that tensor's largest entry, then the worst of each.
  python nbs/benchmarks/loss_tolerance.py --threads 1 --dtype float32   # SmolLM2 + the tiny models
  python nbs/benchmarks/loss_tolerance.py --threads 1 --dtype float64 --smollm2-only
Results: nbs/benchmarks/results/loss_tolerance_cpu.txt
"""
import argparse, torch
from transformers import AutoTokenizer, AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM
from peft import get_peft_model, LoraConfig
from lowbudget_ft.models import model_path
from lowbudget_ft.tiny import tiny_model_path
from lowbudget_ft.loading import load_model
from lowbudget_ft.lora import add_lora
from lowbudget_ft.complaints import load_complaints
from lowbudget_ft.data import prepare_dataset, make_collator
from lowbudget_ft.loss import answer_loss

def loss_and_grads(fn, model, inputs, labels, n=None, **kw):
    model.zero_grad(set_to_none=True); torch.manual_seed(0)
    loss = fn(model, inputs, labels, n, **kw); loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

def full(model, inputs, labels, n=None, **_):
    return model(**inputs, labels=labels, **({} if n is None else dict(num_items_in_batch=n))).loss

def compare(name, model, inputs, labels, worst, n=None, **kw):
    a, ga = loss_and_grads(full, model, inputs, labels, n)
    b, gb = loss_and_grads(answer_loss, model, inputs, labels, n, **kw)
    g = max(float((ga[k] - gb[k]).abs().max()) / float(ga[k].abs().max()) for k in ga if ga[k].abs().max() > 0)
    l = abs(a - b) / abs(a)
    worst[name] = max(worst.get(name, (0, 0))[0], l), max(worst.get(name, (0, 0))[1], g)
    print(f"{name:8} {str(kw):40} loss {l:.2e}  grad {g:.2e}", flush=True)

def batches(tok, starts, rows, packing=False):
    df = load_complaints("train")
    for s in starts:
        ds = prepare_dataset(df.iloc[s:s + rows], tok, prompt="complaint", response="category", max_seq_len=128)
        b = make_collator(tok, packing=packing)([ds[i] for i in range(min(rows, 4))])
        yield b, b.pop("labels")

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1); p.add_argument("--dtype", default="float32")
    p.add_argument("--smollm2-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads); dtype = getattr(torch, a.dtype); worst = {}
    path = model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    smol = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    smol = get_peft_model(smol, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05,
                                           task_type="CAUSAL_LM")).train()
    for b, l in batches(tok, (0, 3, 10, 20), 3):
        for chunk in (1024, 4, 3, 7): compare("smollm2", smol, b, l, worst, chunk=chunk)
    del smol
    if not a.smollm2_only:
        model, tok = load_model(tiny_model_path(), bits=4); model = add_lora(model, rank=8)
        for s in (0, 8, 16):
            (b, l), = batches(tok, (s,), 8); (pb, pl), = batches(tok, (s,), 8, packing=True)
            for kw in (dict(), dict(chunk=5), dict(chunk=7, use_mask=False)): compare("tiny", model, b, l, worst, **kw)
            compare("tiny", model, b, l, worst, n=torch.tensor(int((l != -100).sum()) + 7))
            for kw in (dict(), dict(chunk=3)): compare("tiny", model, pb, pl, worst, **kw)
            torch.manual_seed(0)
            cfg = Gemma2Config(vocab_size=tok.vocab_size + 8, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               final_logit_softcapping=2.0, attn_implementation="eager")
            gemma = get_peft_model(Gemma2ForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear",
                                                                    lora_dropout=0.1, task_type="CAUSAL_LM")).train()
            for kw in (dict(), dict(chunk=4, use_mask=False)): compare("gemma", gemma, b, l, worst, **kw)
            compare("gemma", gemma, pb, pl, worst, chunk=6)
    for k, (l, g) in worst.items(): print(f"WORST {k} threads={a.threads} {a.dtype}: loss {l:.2e}, grad {g:.2e}")

if __name__ == "__main__": main()
