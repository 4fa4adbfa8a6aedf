"""The tutorial's flow on a GPU under T4 conditions, through the library's own functions; one JSON out.

    python nbs/benchmarks/gpu_e2e.py --out $OUT/gpu_e2e.json [--smollm2-dir DIR] [--budget-s 450]
    python nbs/benchmarks/gpu_e2e.py --dry-run --out nbs/benchmarks/results/gpu_e2e_cpu_dry_run.json
    python nbs/benchmarks/gpu_e2e.py --long --out $OUT/gpu_e2e_long.json      # long-context rows only
    python nbs/benchmarks/gpu_e2e.py --long --dry-run --out nbs/benchmarks/results/gpu_e2e_long_cpu_dry_run.json

T4 conditions on a bigger card: memory capped with `torch.cuda.set_per_process_memory_fraction` to
`memory.GPUS["T4"]`, fp16 compute forced through the library's one dtype rule (`LOWBUDGET_FT_DTYPE=fp16`, which
`compute_dtype`, `load_model`, `training_args` and `merge_and_save` all follow), the tutorial's T4 settings.

1. SmolLM2-135M-Instruct (real weights): load_model → add_lora → evaluate_labels (before) → finetune 30 steps →
   evaluate_labels (after) → merge_and_save (logit check) → the merged model's answers against the adapter's.
2. A 7B-class architecture (memory.PRESETS, random weights, built on local disk, no hub): load_model → add_lora →
   finetune 20 steps → a planned-vs-measured grid (batch × seq × rank, checkpointing on; the model's own loss with
   logits at every position, and one setting with the answer-only loss `finetune` uses, planned with its
   `answer_tokens`) → merge_and_save.
3. `--long`: long context instead of 1 and 2. Llama-3.1-8B (memory.PRESETS, random weights), NF4, LoRA r=32,
   batch 1, the loss on the last 256 tokens: one step at 4k, 8k and 16k tokens with each gradient-checkpointing mode
   (none at 4k only; every layer; "offload"), planned vs measured peak, and the host RAM the offload used (bytes
   sent, pinned host memory, process RSS) against the plan's host RAM.
Every phase records planned and measured peak memory, time, tokens/s and out-of-memory events; phases past the
time budget are skipped (and say so). `--dry-run` runs the same code on the CPU at tiny sizes, labelled as such.
Needs torch, transformers, peft, accelerate, bitsandbytes, pandas, openpyxl, pyyaml and lowbudget_ft — no `datasets`
beyond what lowbudget_ft imports, no hub.
"""
import argparse, json, os, platform, shutil, sys, tempfile, time, traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

T4_TUTORIAL = dict(batch_size=4, grad_accum=4, lr=2e-4, rank=16, max_seq_len=256, logging_steps=5)  # the tutorial's GPU branch
PRESET_7B = "Qwen/Qwen2.5-7B"
# (batch, seq, answer tokens) × RANKS: settings the planner's constants were not fitted to; answer tokens None: logits
# at every position (the model's own loss), N: `loss.answer_loss` on the last N positions of each row
GRID = [(1, 256, None), (2, 512, None), (4, 1024, None), (4, 1024, 16)]
RANKS = [8, 64]
PRESET_8B = "meta-llama/Llama-3.1-8B"
# long context: (sequence length, checkpointing modes), each one optimizer step at batch 1, LoRA r=32, 256 answer tokens
LONG = [(4096, (False, True, "offload")), (8192, (True, "offload")), (16384, (True, "offload"))]
DRY = dict(long=[(64, (False, True, "offload")), (128, (True, "offload"))], steps_small=3, steps_7b=2, n_eval=6, grid=[(1, 32, None), (2, 64, None), (2, 64, 4)], ranks=[4, 8],
           arch=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))


def phase(rec, name, fn, deadline):
    "Run `fn()` as phase `name`: its result, peak memory, seconds, out-of-memory or error, into `rec['phases']`."
    import torch
    from lowbudget_ft.core import free_memory, reset_peak, memory_stats
    p = dict(name=name)
    rec["phases"].append(p)
    if time.time() > deadline: p["skipped"] = "time budget spent"; return None
    free_memory(); reset_peak()
    t = time.time()
    try: out = fn(p)
    except torch.OutOfMemoryError as e: p["oom"] = str(e).splitlines()[0][:300]; out = None; rec["oom_events"].append(name)
    except Exception as e: p["error"] = f"{type(e).__name__}: {e}"[:600]; p["trace"] = traceback.format_exc()[-1500:]; out = None
    p["seconds"] = round(time.time() - t, 2)
    p["measured_peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    p["measured_peak_rss"] = None if torch.cuda.is_available() else memory_stats()["peak"]
    print(f"[{name}] {json.dumps({k: v for k, v in p.items() if k != 'trace'}, default=str)[:400]}", flush=True)
    return out


def plan(model, **kw):
    "The planner's figure for what `torch.cuda.max_memory_allocated` should show (`MemoryPlan.allocated`)."
    from lowbudget_ft.memory import plan_memory
    pl = plan_memory(model, gpu="T4", dtype="fp16", recommend=False, **kw)
    return dict(planned_peak=pl.allocated, planned_total=pl.total, planned_fits_t4=pl.fits)


def run_plan(path, model, res):
    ("The plan of the run `finetune` made, read from the run: its settings, the answer tokens of the examples it "
     "trained on (the logits it builds) and the layers it recomputed (gradient_checkpointing='auto' plans against "
     "the T4 cap: `core.gpu_info` follows set_per_process_memory_fraction; an out-of-memory step would turn every "
     "layer on, which the notes show).")
    from lowbudget_ft.lora import checkpointed_layers
    from lowbudget_ft.train import _answer_tokens
    n, (k, L), c = _answer_tokens(res.trainer.train_dataset), checkpointed_layers(model), res.config
    return dict(plan(path, rank=c.rank, batch_size=c.batch_size, max_seq_len=c.max_seq_len, answer_tokens=n,
                     gradient_checkpointing=k), answer_tokens=n, layers_recomputed=f"{k} of {L}")


def tokens_per_s(res):
    v = [r["tokens_per_s"] for r in res.history if r.get("tokens_per_s")]
    return round(sum(v) / len(v), 1) if v else None


def small_model_flow(rec, path, tag, a, deadline, work):
    "SmolLM2 (or the tiny model on a dry run): the tutorial's flow, before/after accuracy, merge agreement."
    import torch
    from lowbudget_ft.complaints import sample_path, CATEGORIES
    from lowbudget_ft.data import read_table
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.lora import add_lora
    from lowbudget_ft.train import finetune
    from lowbudget_ft.evaluate import evaluate_labels
    from lowbudget_ft.export import merge_and_save
    df = read_table(sample_path("xlsx"), sheet="complaints")
    train_df, test_df = df[df.split == "train"], df[df.split == "test"].head(a.n_eval)
    instr = "Route this bank customer complaint. Answer with one category: " + ", ".join(CATEGORIES) + "."
    lab = dict(prompt="complaint", response="category", labels=CATEGORIES, instruction=instr)
    st, s = {}, dict(T4_TUTORIAL, max_steps=a.steps_small, save_every=10_000, output_dir=str(work/f"{tag}-run"), dashboard="quiet")
    if a.dry_run: s.update(batch_size=2, grad_accum=1, max_seq_len=128)
    m = phase(rec, f"{tag}: load_model 4-bit", lambda p: load_model(path, bits=4, gpu="T4" if torch.cuda.is_available() else None,
                                                                   plan_kwargs=dict(batch_size=s["batch_size"], max_seq_len=s["max_seq_len"])), deadline)
    if m is None: return
    model, tok = m
    model = add_lora(model, rank=s["rank"])
    def before(p):
        with model.disable_adapter(): r = evaluate_labels(model, tok, test_df, **lab)
        p["accuracy"], p["unparsed"] = r.accuracy, sum(x is None for x in r.predicted); return r
    phase(rec, f"{tag}: evaluate before", before, deadline)
    def train(p):
        p.update(settings=s)
        res = finetune(model, tok, train_df[["complaint", "category"]], prompt="complaint", response="category", instruction=instr, **s)
        p.update(run_plan(path, model, res))
        p.update(steps=res.steps, train_loss=res.train_loss, tokens_per_s=tokens_per_s(res), notes=res.notes,
                 micro_batch=res.micro_batch)
        st["adapter"] = res.adapter_path; return res
    phase(rec, f"{tag}: finetune", train, deadline)
    def after(p):
        r = evaluate_labels(model, tok, test_df, **lab)
        p["accuracy"], p["unparsed"] = r.accuracy, sum(x is None for x in r.predicted); st["after"] = r; return r
    phase(rec, f"{tag}: evaluate after", after, deadline)
    del model; torch.cuda.empty_cache() if torch.cuda.is_available() else None
    def merge(p):
        rep = merge_and_save(st["adapter"], work/f"{tag}-merged", check=True)
        p.update(dtype=rep.dtype, max_logit_diff=rep.max_diff, tol=rep.tol, logits_agree=rep.ok)
        from transformers import AutoModelForCausalLM
        from lowbudget_ft.core import compute_dtype
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        merged = AutoModelForCausalLM.from_pretrained(str(work/f"{tag}-merged"), dtype=compute_dtype(), device_map=dev).eval()
        r = evaluate_labels(merged, tok, test_df, **lab)
        p["merged_accuracy"] = r.accuracy
        p["answers_agree_with_adapter"] = sum(x == y for x, y in zip(r.predicted, st["after"].predicted)) / len(r.predicted)
    if "adapter" in st: phase(rec, f"{tag}: merge_and_save + merged answers", merge, deadline)


def build_7b(a, work, preset=PRESET_7B, name="arch7b"):
    "A 7B-class model with random weights from a planner preset, written to local disk with a tokenizer (no hub)."
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lowbudget_ft.memory import model_config
    cfg = model_config(preset)
    if a.dry_run:  # the same architecture, shrunk
        from transformers import AutoConfig
        d = {k: v for k, v in cfg.to_dict().items() if k != "layer_types"}
        cfg = AutoConfig.for_model(d.pop("model_type"), **{**d, **DRY["arch"]})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev): m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16 if dev == "cuda" else torch.float32)
    d = work/name
    m.save_pretrained(d); n = m.num_parameters(); del m
    AutoTokenizer.from_pretrained(a.tokenizer_dir).save_pretrained(d)  # ids < the 7B vocab; the text is only a carrier
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    return d, n


def grid_step(model, b, s, steps=2, answer_tokens=None):
    ("Peak of `steps` training steps at batch `b` × seq `s` (fp16 autocast, 8-bit paged AdamW as finetune uses); with "
     "`answer_tokens` N the answer-only loss on the last N positions of each row.")
    import torch, bitsandbytes as bnb
    from lowbudget_ft.core import compute_dtype, reset_peak
    from lowbudget_ft.loss import answer_loss
    from lowbudget_ft.memory import answer_labels
    dev = next(model.parameters()).device
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (b, s), device=dev)
    labels = None if answer_tokens is None else answer_labels(ids, answer_tokens)
    reset_peak(); t = time.time()
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=compute_dtype(), enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss if labels is None else answer_loss(model, {"input_ids": ids}, labels)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if dev.type == "cuda": torch.cuda.synchronize()
    return dict(tokens_per_s=round(steps * b * s / (time.time() - t), 1), loss=float(loss))


def big_model_flow(rec, a, deadline, work):
    import torch
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.lora import add_lora
    from lowbudget_ft.train import finetune
    from lowbudget_ft.export import merge_and_save
    from lowbudget_ft.complaints import sample_path
    from lowbudget_ft.data import read_table
    cap = torch.cuda.is_available()
    st = {}
    def build(p):
        if cap: torch.cuda.set_per_process_memory_fraction(1.0)  # built outside the T4 cap (a T4 user downloads it instead)
        d, n = build_7b(a, work); st["dir"] = d; p.update(preset=PRESET_7B, params=n, dry_run_arch=DRY["arch"] if a.dry_run else None)
        if cap: set_t4_cap(rec)
    phase(rec, "7b: build random weights from preset", build, deadline)
    if "dir" not in st: return
    arch = str(st["dir"])
    df = read_table(sample_path("xlsx"), sheet="complaints")
    s = dict(T4_TUTORIAL, max_steps=a.steps_7b, save_every=10_000, output_dir=str(work/"7b-run"), dashboard="quiet")
    if a.dry_run: s.update(batch_size=2, grad_accum=1, max_seq_len=64)
    m = phase(rec, "7b: load_model 4-bit", lambda p: load_model(arch, bits=4, gpu="T4" if cap else None,
                                                              plan_kwargs=dict(batch_size=s["batch_size"], max_seq_len=s["max_seq_len"])), deadline)
    if m is None: return
    model, tok = m
    model = add_lora(model, rank=s["rank"])
    def train(p):
        p.update(settings=s)
        res = finetune(model, tok, df[df.split == "train"][["complaint", "category"]], prompt="complaint", response="category", **s)
        p.update(run_plan(arch, model, res))
        p.update(steps=res.steps, train_loss=res.train_loss, tokens_per_s=tokens_per_s(res), notes=res.notes, micro_batch=res.micro_batch)
        st["adapter"] = res.adapter_path
    phase(rec, "7b: finetune", train, deadline)
    base = model.get_base_model()
    for r in (DRY["ranks"] if a.dry_run else RANKS):
        model = model.unload() if hasattr(model, "unload") else base
        model = add_lora(model, rank=r)
        for b, sl, n in (DRY["grid"] if a.dry_run else GRID):
            def g(p, b=b, sl=sl, r=r, n=n):
                p.update(plan(arch, rank=r, batch_size=b, max_seq_len=sl, answer_tokens=n), batch=b, seq=sl, rank=r,
                         answer_tokens=n, gradient_checkpointing=True)
                p.update(grid_step(model, b, sl, answer_tokens=n))
            phase(rec, f"7b grid: batch {b} x seq {sl}, rank {r}" + (f", answer-only loss ({n} tokens)" if n else ""), g, deadline)
    del model, base; free()
    def merge(p):
        rep = merge_and_save(st["adapter"], work/"7b-merged", check=True)
        p.update(dtype=rep.dtype, max_logit_diff=rep.max_diff, tol=rep.tol, logits_agree=rep.ok)
    if "adapter" in st: phase(rec, "7b: merge_and_save", merge, deadline)


def host_ram():
    "Host RAM now: the process's resident and peak resident bytes, and pinned host memory held by torch (CUDA)."
    import resource, torch
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = dict(rss=rss, rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats"):
        out["pinned"] = torch.cuda.host_memory_stats().get("allocated_bytes.all.current")
    return out


def long_context_flow(rec, a, deadline, work):
    "Llama-3.1-8B shapes, random weights, T4 cap: one step per (length, checkpointing mode), planned vs measured."
    import torch
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.lora import add_lora
    from lowbudget_ft.memory import plan_memory
    cap, st = torch.cuda.is_available(), {}
    def build(p):
        if cap: torch.cuda.set_per_process_memory_fraction(1.0)
        d, n = build_7b(a, work, PRESET_8B, "arch8b"); st["dir"] = d; p.update(preset=PRESET_8B, params=n)
        if cap: set_t4_cap(rec)
    phase(rec, "8b: build random weights from preset", build, deadline)
    if "dir" not in st: return
    arch = str(st["dir"])
    m = phase(rec, "8b: load_model 4-bit", lambda p: load_model(arch, bits=4, check_fit=False), deadline)
    if m is None: return
    st["base"] = m[0]
    for s, modes in (DRY["long"] if a.dry_run else LONG):
        for mode in modes:  # a fresh load has checkpointing off: False comes first
            def g(p, s=s, mode=mode):
                model = add_lora(st["base"], rank=32, gradient_checkpointing=mode).train()  # layers checkpoint in training only
                n = min(256, s // 2)
                pl = plan_memory(arch, gpu="T4" if cap else None, dtype="fp16" if cap else None, rank=32, batch_size=1,
                                 max_seq_len=s, answer_tokens=n, gradient_checkpointing=mode, recommend=False)
                p.update(plan(arch, rank=32, batch_size=1, max_seq_len=s, answer_tokens=n, gradient_checkpointing=mode),
                         seq=s, mode=str(mode), answer_tokens=n, planned_host=pl.host, planned_host_total=pl.host_total)
                try:
                    p.update(grid_step(model, 1, s, steps=1, answer_tokens=n))
                    off = model.activation_offload
                    p.update(offloaded_bytes=off.bytes_out if off else 0, host_ram=host_ram())
                finally: st["base"] = model.unload()
            phase(rec, f"8b long context: seq {s}, gradient_checkpointing={mode!r}", g, deadline)


def free():
    import gc, torch
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def set_t4_cap(rec):
    import torch
    from lowbudget_ft.memory import GPUS
    total = torch.cuda.get_device_properties(0).total_memory
    frac = min(GPUS["T4"] / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(frac)
    rec["t4_cap"] = dict(bytes=GPUS["T4"], fraction=round(frac, 5), device_total=total)


def resolve_smollm2(a):
    try:
        from lowbudget_ft.models import model_path
        return str(model_path("smollm2")), "lowbudget_ft.models.model_path('smollm2')"
    except ImportError:
        if a.smollm2_dir: return a.smollm2_dir, "--smollm2-dir"
    raise SystemExit("SmolLM2 not found: install a lowbudget_ft with lowbudget_ft.models, or pass --smollm2-dir DIR")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_e2e.json", help="the JSON to write")
    ap.add_argument("--smollm2-dir", default=None, help="SmolLM2-135M-Instruct as a local model folder, when lowbudget_ft.models is missing")
    ap.add_argument("--budget-s", type=float, default=450, help="skip phases that would start after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code path; the JSON says dry_run")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--long", action="store_true", help="only the long-context rows (Llama-3.1-8B shapes, 4k-16k)")
    a = ap.parse_args(argv)
    import torch, transformers, peft
    from lowbudget_ft.core import gpu_info, compute_dtype
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run: raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    if cuda: os.environ["LOWBUDGET_FT_DTYPE"] = "fp16"  # fp16 compute as on a T4, through the library's one dtype rule
    a.n_eval, a.steps_small, a.steps_7b = (DRY["n_eval"], DRY["steps_small"], DRY["steps_7b"]) if a.dry_run else (60, 30, 20)
    rec = dict(dry_run=a.dry_run, label=("CPU DRY RUN — tiny sizes, not GPU figures" if a.dry_run else "GPU run under T4 conditions"),
               device=str(gpu_info()), compute_dtype=str(compute_dtype()), python=platform.python_version(),
               versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__),
               phases=[], oom_events=[], started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if cuda: set_t4_cap(rec)
    t0 = time.time(); deadline = t0 + a.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu_e2e-"))
    try:
        if a.long:
            a.tokenizer_dir = str(__import__("lowbudget_ft.tiny", fromlist=["x"]).tiny_model_path()) if a.dry_run \
                else resolve_smollm2(a)[0]
            return long_context_flow(rec, a, deadline, work)
        if a.dry_run:
            from lowbudget_ft.tiny import tiny_model_path
            small, how = str(tiny_model_path()), "tiny model (dry run)"
        else: small, how = resolve_smollm2(a)
        rec["small_model"] = dict(path=small, resolved_by=how)
        a.tokenizer_dir = small
        small_model_flow(rec, small, "smollm2" if not a.dry_run else "tiny", a, deadline, work)
        free()
        if not a.skip_7b: big_model_flow(rec, a, deadline, work)
    finally:
        rec["seconds"] = round(time.time() - t0, 1)
        for p in rec["phases"]:
            if p.get("planned_peak") and p.get("measured_peak"): p["measured_over_planned"] = round(p["measured_peak"] / p["planned_peak"], 3)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rec, indent=1, default=str) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        print(f"wrote {a.out} ({rec['seconds']} s, {len(rec['oom_events'])} OOM events)")


if __name__ == "__main__": main()
