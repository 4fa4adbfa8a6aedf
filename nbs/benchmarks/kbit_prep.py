"""k-bit preparation: peft's fp32 upcast of every 16-bit module against `lora.prepare_kbit` (and with fp32 norms).

SmolLM2-135M in 4-bit NF4 with a 16-bit compute dtype on the CPU, LoRA r16 on all linears, 20 AdamW steps (lr 1e-3)
on one batch of 2 x 64 tokens of README.md under autocast, so the loss falls fast and any instability shows. Each
variant runs in its own process (same seed, same LoRA initialisation); the summary puts the bytes held by the frozen
base, the losses and step 1's LoRA gradients side by side.

    python nbs/benchmarks/kbit_prep.py --dtype bf16        # runs peft, ours, norms; prints and writes the summary
    python nbs/benchmarks/kbit_prep.py --variant ours --dtype fp16 --out /tmp/x.pt   # one variant
"""
import argparse, subprocess, sys, tempfile, time, warnings
from pathlib import Path

VARIANTS = ("peft", "ours", "norms")

def run_variant(variant, dtype_name, out, steps=20, seq=64, lr=1e-3):
    import torch
    from peft import prepare_model_for_kbit_training
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.lora import add_lora, prepare_kbit
    from lowbudget_ft.memory import held_bytes
    warnings.simplefilter("ignore")
    dt = dict(bf16=torch.bfloat16, fp16=torch.float16)[dtype_name]
    m, tok = load_model("smollm2", dtype=dt, check_fit=False)
    before = held_bytes(m)
    if variant == "peft": m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    else: m = prepare_kbit(m, upcast_norms=variant == "norms")
    after = held_bytes(m)
    torch.manual_seed(0)
    m = add_lora(m, rank=16, alpha=32, dropout=0.0, gradient_checkpointing=True).train()
    text = (Path(__file__).parents[2] / "README.md").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, : 2 * seq].reshape(2, seq)
    ps = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(ps, lr=lr)
    losses, t0 = [], time.time()
    for i in range(steps):
        with torch.autocast("cpu", dtype=dt): loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        if i == 0: g0 = torch.cat([p.grad.float().flatten() for p in ps])
        opt.step(); opt.zero_grad(); losses.append(loss.item())
    torch.save(dict(variant=variant, dtype=dtype_name, before=before, after=after, losses=losses, g0=g0,
                    s_per_step=(time.time() - t0) / steps), out)

def summary(runs):
    import math, torch
    ref = runs["peft"]
    lines = [f"SmolLM2-135M 4-bit, {ref['dtype']} compute, CPU; 20 steps, lr 1e-3, one batch of 2 x 64 tokens",
             f"{'variant':<8} {'frozen base held (B)':>22} {'vs loaded':>12} {'loss 1':>8} {'loss 2':>8} {'loss 10':>8} "
             f"{'loss 20':>8} {'max |dloss|/loss vs peft':>26} {'grad rel diff':>14} {'all finite':>10}"]
    for v, r in runs.items():
        l = torch.tensor(r["losses"]); dl = ((l - torch.tensor(ref["losses"])).abs() / torch.tensor(ref["losses"]))
        gd = ((r["g0"] - ref["g0"]).norm() / ref["g0"].norm()).item()
        lines.append(f"{v:<8} {r['after']:>22,} {r['after'] - r['before']:>+12,} {l[0]:>8.4f} {l[1]:>8.4f} {l[9]:>8.4f} "
                     f"{l[19]:>8.4f} {dl.max().item():>26.4f} {gd:>14.4f} {str(all(map(math.isfinite, r['losses']))):>10}")
    return "\n".join(lines)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--variant", choices=VARIANTS); ap.add_argument("--out")
    ap.add_argument("--from-files", nargs="*", help="summarise saved runs (one .pt per variant) instead of running")
    a = ap.parse_args()
    if a.variant: run_variant(a.variant, a.dtype, a.out); sys.exit(0)
    import torch
    if a.from_files: runs = {r["variant"]: r for r in (torch.load(f) for f in a.from_files)}
    else:
        tmp = tempfile.mkdtemp(); runs = {}
        for v in VARIANTS:
            f = f"{tmp}/{v}.pt"
            subprocess.run([sys.executable, __file__, "--variant", v, "--dtype", a.dtype, "--out", f], check=True)
            runs[v] = torch.load(f)
    text = summary(runs); print(text)
    out = Path(__file__).parent / "results" / "kbit_prep_cpu.txt"
    with out.open("a") as fh: fh.write(text + "\n\n")
