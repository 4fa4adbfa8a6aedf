"""Planner vs reality: real-size architectures (random weights, no hub), NF4 + LoRA, a few training steps per setting.

    python nbs/benchmarks/gpu_check.py [--small] [--out results.json] [--steps 3]

On a GPU it builds Llama-3.1-8B and Llama-2-7B shapes from their configs, quantises every decoder linear to NF4
(double quant) the way transformers' bitsandbytes integration does, adds LoRA r=16 on all linears with peft's k-bit
preparation, and runs a few optimizer steps (paged 8-bit AdamW, bf16 autocast) for each setting. It prints the
planner's estimate of `torch.cuda.max_memory_allocated()` beside the measured peak and their ratio.
A setting's fifth element, `answer_tokens` N, trains the loss `finetune` uses (`loss.answer_loss`, labels -100 outside
the last N positions of each row) and plans with `plan_memory(answer_tokens=N)`; None is the model's own loss with
logits at every position. Every row also records `saved`, the bytes autograd keeps from the first step's forward.
`--small` runs the same code on the CPU with tiny widths (estimate vs bytes held, as the CPU has no allocator peak).
"""
import argparse, json, sys, time, gc, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from torch import nn

def build(preset, small, dev, dt, dq=True):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from lowbudget_ft.memory import model_config, architecture
    cfg = model_config(preset)
    if small: cfg.update(dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=min(cfg.vocab_size, 4000)))
    quant = {n for n, *_ in architecture(cfg).quantized}
    with torch.device(dev): model = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation="sdpa")
    for name in quant:  # what transformers' replace_with_bnb_linear + loading does, without a checkpoint on disk
        parent, child = name.rsplit(".", 1); lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=dt, compress_statistics=dq, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=dq).to(dev)
        if lin.bias is not None: q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent), child, q); del lin
    model.is_loaded_in_4bit = True; model.config.use_cache = False
    return model, cfg

def run(setting, small, steps, dev, dt):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from lowbudget_ft.memory import plan_memory, held_bytes, saved_activation_bytes, answer_labels, STATIC_COMPONENTS
    from lowbudget_ft.loss import LOSS_CHUNK, answer_loss
    preset, bs, seq, ckpt, ans = setting
    model, cfg = build(preset, small, dev, dt)
    gc.collect()
    if dev == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")).train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=dev)
    labels = None if ans is None else answer_labels(ids, ans)
    def step_loss():
        with torch.autocast(dev, dtype=dt, enabled=dev == "cuda"):
            if labels is None: return model(input_ids=ids, labels=ids).loss
            return answer_loss(model, {"input_ids": ids}, labels, chunk=LOSS_CHUNK)
    t = time.time()
    for i in range(steps):
        if i == 0: box = []; saved = saved_activation_bytes(model, ids, forward=lambda: box.append(step_loss())); loss = box[0]
        else: loss = step_loss()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    plan = plan_memory(cfg, batch_size=bs, max_seq_len=seq, gradient_checkpointing=ckpt, answer_tokens=ans, loss_chunk=LOSS_CHUNK, gpu="H200" if dev == "cuda" else "T4", dtype=2 if dev == "cuda" else 4, recommend=False)
    row = dict(model=preset, batch_size=bs, seq_len=seq, checkpointing=ckpt, answer_tokens=ans, loss=float(loss), s_per_step=(time.time() - t) / steps, saved=saved, components=plan.components)
    if dev == "cuda":
        row.update(estimate=plan.allocated, measured=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(), before_lora=base)
    else:
        row.update(estimate=sum(plan.components.get(k, 0) for k in STATIC_COMPONENTS if k != "LoRA grads"), measured=held_bytes(model, opt))  # grads were freed
    row["ratio"] = row["estimate"] / row["measured"]
    del model, opt, loss; gc.collect()
    if dev == "cuda": torch.cuda.empty_cache()
    return row

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny widths on the CPU (tests the script)")
    ap.add_argument("--out", default="gpu_check.json"); ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    dev = "cpu" if a.small or not torch.cuda.is_available() else "cuda"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    grid = [("Llama-3.1-8B", 1, 512, True), ("Llama-3.1-8B", 1, 2048, True), ("Llama-3.1-8B", 4, 2048, True), ("Llama-3.1-8B", 1, 512, False),
            ("Llama-3.1-8B", 4, 512, False), ("Llama-2-7b-hf", 1, 512, True), ("Llama-2-7b-hf", 4, 2048, True), ("Llama-2-7b-hf", 1, 2048, False)]
    grid = [(*g, None) for g in grid]  # answer_tokens None: logits at every position
    # answer-only loss (the planner's answer_tokens term): beside their full-logits twins above; 512 x 4 > LOSS_CHUNK runs in chunks
    grid += [("Llama-3.1-8B", 4, 2048, True, 4), ("Llama-3.1-8B", 4, 512, False, 4), ("Llama-3.1-8B", 4, 2048, True, 512),
             ("Llama-2-7b-hf", 4, 2048, True, 4)]
    if a.small: grid = [(m, b, s // 16, c, n if n is None else max(4, n // 16)) for m, b, s, c, n in grid]
    rows = []
    print(f"{'model':<14}{'bs':>3}{'seq':>6}{'ckpt':>6}{'answer':>7}{'estimate':>14}{'measured':>14}{'ratio':>7}{'logits+loss':>13}{'saved':>13}", flush=True)
    for st in grid:
        r = run(st, a.small, a.steps, dev, dt); rows.append(r)
        print(f"{r['model']:<14}{r['batch_size']:>3}{r['seq_len']:>6}{str(r['checkpointing']):>6}{str(r['answer_tokens'] or 'all'):>7}{r['estimate']:>14,}{r['measured']:>14,}{r['ratio']:>7.3f}"
              f"{r['components']['logits + loss']:>13,}{r['saved']:>13,}", flush=True)
        Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__, rows=rows), indent=1))
    return 0

if __name__ == "__main__": sys.exit(main())
