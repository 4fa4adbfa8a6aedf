"""FSDP-QLoRA through accelerate on the CPU: does it really shard, and does it train as one process does?

Two processes (gloo), SmolLM2-135M-Instruct in 4-bit NF4 + LoRA r16 on every linear layer, the library's own path:
`load_model` (which sees `accelerate launch`'s FSDP and packs the 4-bit weights in the compute dtype), `add_lora`,
`finetune` (the `LowBudgetTrainer`, i.e. transformers' Trainer driving accelerate's FSDP plugin). The script runs:

  0. probes (seconds each): the shipped `accelerate_fsdp.yaml` on this CPU machine; `accelerate_fsdp_cpu.yaml` as
     accelerate 1.16 reads it (FSDP dropped: MULTI_CPU, i.e. DDP) and with this script's CPU patches (FSDP);
     torch's FSDP1 full state dict on the CPU with and without the fix of its `to_cpu` (tiny model);
  1. the reference: one process, micro-batch 2 x grad_accum 2 (global batch 4), `python fsdp_cpu.py --worker ref`;
  2. FSDP: `accelerate launch --config_file lowbudget_ft/data/accelerate_fsdp_cpu.yaml --num_processes 2
     fsdp_cpu.py --worker fsdp`: micro-batch 2 per process x 2 processes (global batch 4), same seed and data;
     FSDP1 (accelerate_fsdp_cpu.yaml as written) and then FSDP2 (the same file with fsdp_version 2, written to the
     work folder);
     prints the FSDP-wrapped modules, the bytes of each rank's local shards against the unsharded size, trains 10
     steps, saves the adapter once (all ranks gather the full state dict, rank 0 writes it: `Trainer.save_model`);
  3. the comparison: loss per step side by side (with the micro-batches each step saw, by a hash of their input ids),
  4. the adapters loaded with plain peft (`PeftModel.from_pretrained` on the 4-bit base), logits on fixed inputs;
  5. a short run (3 steps) with the library's default optimizer, paged_adamw_8bit, 1 process vs FSDP1 and FSDP2.

What accelerate 1.16 / torch 2.13 need on the CPU (applied only in the FSDP worker, see `cpu_fsdp_patches`):
  * accelerate's `AcceleratorState` keeps FSDP only for accelerator devices: with `use_cpu` the run is MULTI_CPU
    (plain DDP), the FSDP plugin dropped without a word; without `use_cpu` each process trains alone
    (DistributedType.NO). The patch turns MULTI_CPU + an FSDP plugin into FSDP.
  * accelerate's device is `cpu:0` and FSDP1 compares it with the module's `cpu`: "Inconsistent compute device and
    `device_id`". The patch makes it `cpu`.
  * torch FSDP1's full state dict with `offload_to_cpu=True` (accelerate's `get_state_dict` hard-codes it) frees the
    unsharded parameter it has just "moved" to the CPU when it already is there ("setStorage: ... out of bounds for
    storage of size 0"). The patch makes `FlatParamHandle.to_cpu` a no-op for a parameter already on the CPU.
  * `finetune` saves the adapter on rank 0 only (`save_adapter` -> `PeftModel.save_pretrained` -> `state_dict()`),
    but under FSDP that state dict is a collective (all-gather): rank 0 waits for ranks that have returned
    ("Connection closed by peer"). Here `save_adapter` is replaced, in the FSDP worker only, by a no-op, and the
    adapter is saved after `finetune` returns with `Trainer.save_model` on every rank (what the library should do).
  * peft 0.21 (nothing CPU-specific in it; FSDP1 only) writes an EMPTY adapter from the gathered full state dict:
    it matches keys by module names and strips `_fsdp_wrapped_module.` only at the start of a name, while the
    wrapped decoder layers put it in the middle. `peft_fsdp_save_fix` strips it everywhere; the FSDP worker counts
    the keys with and without it.

Run:  OMP_NUM_THREADS=1 .venv/bin/python nbs/benchmarks/fsdp_cpu.py [--steps 10] [--fsdp-versions 1,2] [--no-probes]
      [--out nbs/benchmarks/results/fsdp_cpu]   (writes OUT.txt and OUT.json; ~10 min on 2 shared cores)
Settings: SmolLM2 4-bit NF4 (double quant), LoRA r16 all-linear, dropout 0 (dropout masks would differ between one
process running two micro-batches and two processes running one each), adamw_torch (bitsandbytes' 8-bit states are
quantised in blocks over each tensor, and FSDP hands the optimizer shards), gradient checkpointing off, packing on
(the default), max_seq_len 128, lr 1e-3, 1 thread per process.
"""
import argparse, contextlib, hashlib, json, os, shutil, socket, subprocess, sys, tempfile, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
VENV_BIN = Path(sys.executable).parent
CPU_CONFIG = ROOT/"lowbudget_ft"/"data"/"accelerate_fsdp_cpu.yaml"
SHIPPED_CONFIG = ROOT/"lowbudget_ft"/"data"/"accelerate_fsdp.yaml"
LOSS_TOL = 1e-3  # |loss(1 process) - loss(2 processes, FSDP)| per step, nats per answer token
LOGIT_TOL = 1e-2  # max |logit(adapter of 1 process) - logit(adapter of FSDP)| on the fixed inputs (logits are ~10-30)
SETTINGS = dict(max_seq_len=128, batch_size=2, lr=1e-3, rank=16, dropout=0.0, optimizer="adamw_torch", seed=0)
LINES = []

def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True); LINES.append(s)

def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
             PYTHONWARNINGS="ignore")
    e.setdefault("LOWBUDGET_FT_CACHE", str(ROOT/".cache"/"lowbudget_ft"))
    return e

# ----------------------------------------------------------------------------------------------------------------------
# the CPU patches (FSDP worker only)

def cpu_fsdp_patches():
    "Let accelerate 1.16 run its FSDP plugin on the CPU (see the module docstring for each reason)."
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__
    def patched_init(self, *a, fsdp_plugin=None, **kw):
        init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # accelerate only does this for accelerator devices
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            PartialState._shared_state["device"] = self.device = torch.device("cpu")  # not cpu:0 (FSDP1's check)
    AcceleratorState.__init__ = patched_init
    from torch.distributed.fsdp._flat_param import FlatParamHandle
    to_cpu = FlatParamHandle.to_cpu
    @contextlib.contextmanager
    def patched_to_cpu(self):
        if self.flat_param.device.type == "cpu":  # already there: torch would free the storage it just "moved"
            yield; return
        with to_cpu(self): yield
    FlatParamHandle.to_cpu = patched_to_cpu

def peft_fsdp_save_fix():
    ("peft 0.21 finds an adapter's keys by module names, dropping `_fsdp_wrapped_module.` only at the start of a name: "
     "with the decoder layers wrapped (FSDP1 auto-wrap) the names hold it in the middle, no key matches, and "
     "`save_pretrained(state_dict=full)` writes an EMPTY adapter. Not CPU-specific. Returns the unpatched function.")
    import peft.tuners.tuners_utils as TU
    orig = TU._get_tuner_state_dict_key_prefixes
    def fixed(*a, **k): return {p.replace("_fsdp_wrapped_module.", "") for p in orig(*a, **k)}
    TU._get_tuner_state_dict_key_prefixes = fixed
    return orig

# ----------------------------------------------------------------------------------------------------------------------
# probe worker: what accelerate makes of a config, and torch's full state dict on the CPU

def probe(args):
    import torch
    if args.patch: cpu_fsdp_patches()
    args.patch = args.patch or args.no_torch_fix
    from accelerate import Accelerator
    out = dict(config=args.config_name, accelerate_patch=args.patch,
               torch_to_cpu_fix=args.patch and not args.no_torch_fix)
    try:
        acc = Accelerator(cpu=True)  # what TrainingArguments(use_cpu=True) does on a CPU machine
        out.update(distributed_type=str(acc.distributed_type), num_processes=acc.num_processes,
                   device=str(acc.device), fsdp_plugin=getattr(acc.state, "fsdp_plugin", None) is not None)
        if args.state_dict and acc.distributed_type.name == "FSDP":
            torch.manual_seed(0)
            m = acc.prepare(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
            out["local_numel"] = sum(p.numel() for p in m.parameters())
            try:
                sd = acc.get_state_dict(m)
                n = sum(v.numel() for v in sd.values())
                out["full_state_dict"] = f"ok: {n} elements on rank {acc.process_index}"
            except Exception as e:
                out["full_state_dict"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if int(os.environ.get("RANK", 0)) == 0: print("PROBE " + json.dumps(out), flush=True)

# ----------------------------------------------------------------------------------------------------------------------
# training worker (ref: 1 process; fsdp: each of 2 processes)

def _fp(t) -> str: return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]

def _bytes_by_kind(model) -> dict:
    "Bytes of the model's parameters (unsharded, before FSDP), by kind."
    kinds = {}
    for n, p in model.named_parameters():
        k = "lora" if "lora_" in n else "4bit_packed" if type(p).__name__ == "Params4bit" else "other"
        kinds[k] = kinds.get(k, 0) + p.numel() * p.element_size()
    return kinds

def _kind(name:str, module) -> str:
    return ("lora" if "lora_" in name else
            "4bit_packed" if type(module).__name__ == "Linear4bit" and name.endswith("weight") else "other")

def _fsdp_units(root) -> list:
    ("One row per FSDP unit: its name, the wrapped module's class, the bytes it holds locally (this rank's shards) "
     "and unsharded, by kind (4-bit packed weights, LoRA, other).")
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1, FSDPModule
    rows = []
    if isinstance(root, FSDP1):  # FSDP1: one FlatParameter per unit, each rank holds 1/world of it
        for name, m in root.named_modules():
            if not isinstance(m, FSDP1): continue
            name = name.replace("_fsdp_wrapped_module.", "").replace("._fsdp_wrapped_module", "")
            row = dict(name=name or "(root)", cls=type(m.module).__name__, params=0, local={}, full={}, storage=0,
                       dtype=None)
            h = m._handle
            if h is not None:
                fp = h.flat_param
                isz = fp.element_size()
                row.update(params=len(fp._fqns), dtype=str(fp.dtype).replace("torch.", ""),
                           storage=fp.untyped_storage().nbytes())
                for pi, fqn, numel, si in zip(fp._param_infos, fp._fqns, fp._numels, fp._shard_param_infos):
                    k = _kind(f"{name}.{fqn}", pi.module)
                    row["full"][k] = row["full"].get(k, 0) + numel * isz
                    if si.in_shard: row["local"][k] = row["local"].get(k, 0) + si.numel_in_shard * isz
            rows.append(row)
        return rows
    # FSDP2 (fully_shard): every parameter a DTensor sharded on dim 0, owned by the innermost FSDPModule above it
    units = {n: m for n, m in root.named_modules() if isinstance(m, FSDPModule)}
    for n, m in units.items():
        cls = next(c.__name__ for c in type(m).__mro__ if not c.__name__.startswith("FSDP"))
        rows.append(dict(name=n or "(root)", cls=cls, params=0, local={}, full={}, storage=0, dtype=None))
    by_name = {r["name"]: r for r in rows}
    seen = set()
    for pn, p in root.named_parameters():
        owner = max((u for u in units if u == "" or pn.startswith(u + ".")), key=len)
        r = by_name[owner or "(root)"]
        loc = p.to_local() if hasattr(p, "to_local") else p
        k = _kind(pn, root.get_submodule(pn.rsplit(".", 1)[0]))
        r["params"] += 1; r["dtype"] = str(p.dtype).replace("torch.", "")
        r["full"][k] = r["full"].get(k, 0) + p.numel() * p.element_size()
        r["local"][k] = r["local"].get(k, 0) + loc.numel() * loc.element_size()
        st = loc.untyped_storage()
        if st.data_ptr() not in seen: seen.add(st.data_ptr()); r["storage"] += st.nbytes()
    return rows

def _quant_state_bytes(model) -> int:
    "Bytes of the 4-bit scales (quant_state: absmax, nested absmax, code): module attributes, not parameters."
    import torch
    seen, total = set(), 0
    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen: seen.add(id(t)); total += t.numel() * t.element_size()
    for m in model.modules():
        qs = getattr(m, "quant_state", None)
        if qs is None or type(m).__name__ != "Linear4bit": continue
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)): add(t)
        if getattr(qs, "state2", None) is not None:
            for t in (qs.state2.absmax, qs.state2.code): add(t)
    return total

def train_worker(args):
    import torch
    fsdp = args.worker == "fsdp"
    if fsdp: cpu_fsdp_patches(); peft_unfixed = peft_fsdp_save_fix()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import lowbudget_ft.train as T
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.lora import add_lora
    from lowbudget_ft.config import RunConfig
    from transformers import set_seed
    rank = int(os.environ.get("RANK", 0))
    out = Path(args.out)
    t0 = time.time()
    model, tok = load_model("smollm2", check_fit=False)  # FSDP: sees ACCELERATE_USE_FSDP, packs 4-bit weights in fp32
    qcfg = model.config.quantization_config
    qstorage = str(qcfg.get("bnb_4bit_quant_storage") if isinstance(qcfg, dict) else qcfg.bnb_4bit_quant_storage)
    set_seed(args.seed)
    model = add_lora(model, rank=args.rank, dropout=args.dropout, gradient_checkpointing=False)
    t_load = time.time() - t0
    before = _bytes_by_kind(model)
    lora_fp = _fp(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad]))
    qs_bytes = _quant_state_bytes(model)
    seen = []  # (hash of input_ids, shape) of every training forward, in order
    def pre(mod, a, kw):
        if mod.training and kw.get("input_ids") is not None:
            seen.append([_fp(kw["input_ids"]), list(kw["input_ids"].shape)])
    model.get_base_model().register_forward_pre_hook(pre, with_kwargs=True)
    skipped_save = []
    if fsdp:  # finetune's rank-0-only save deadlocks under FSDP (module docstring); saved below on every rank instead
        assert hasattr(T, "save_adapter"), "lowbudget_ft.train.save_adapter moved: update this benchmark"
        T.save_adapter = lambda *a, **k: skipped_save.append(str(a[2]) if len(a) > 2 else "?")
    cfg = RunConfig(model="smollm2", max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                    grad_accum=1 if fsdp else 2, max_steps=args.steps, logging_steps=1, save_every=10_000,
                    save_minutes=0, output_dir=str(out/"run"), dashboard="quiet", optimizer=args.optimizer, lr=args.lr,
                    seed=args.seed, dropout=args.dropout, rank=args.rank)
    t1 = time.time()
    res = T.finetune(model, tok, config=cfg, overwrite=True, check_fit=False)
    t_train = time.time() - t1
    tr = res.trainer
    losses = [dict(step=h["step"], loss=h["loss"], grad_norm=h.get("grad_norm"), lr=h.get("learning_rate"))
              for h in tr.state.log_history if "loss" in h]
    R = dict(worker=args.worker, world_size=tr.args.world_size, distributed_type=str(tr.accelerator.distributed_type),
             is_fsdp=bool(tr.is_fsdp_enabled), wrapped=type(tr.model_wrapped).__name__, quant_storage=qstorage,
             load_s=t_load, train_s=t_train, steps=res.steps, losses=losses, bytes_before=before,
             quant_state_bytes=qs_bytes, lora_init_fingerprint=lora_fp, settings=vars(args), rss=_rss(),
             peak_rss=_peak_rss(), checkpoint=_checkpoint_tensors(out/"run") if rank == 0 else {})
    if not fsdp:
        R.update(adapter=str(res.adapter_path), forwards=[seen])
    else:
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        root = tr.model_wrapped
        units = _fsdp_units(root)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, dict(rank=rank, units=units, lora_init=lora_fp, forwards=seen,
                                              rss=_rss(), peak_rss=_peak_rss(), quant_state_bytes=qs_bytes))
        from peft.utils import get_peft_model_state_dict
        sd = tr.accelerator.get_state_dict(tr.model)  # a collective: every rank; the full state dict lands on rank 0
        if rank == 0:
            import peft.tuners.tuners_utils as TU
            pm, fixed = tr.accelerator.unwrap_model(tr.model), TU._get_tuner_state_dict_key_prefixes
            TU._get_tuner_state_dict_key_prefixes = peft_unfixed
            n_unfixed = len(get_peft_model_state_dict(pm, state_dict=sd))
            TU._get_tuner_state_dict_key_prefixes = fixed
            R["peft_adapter_keys"] = dict(full_state_dict_keys=len(sd), peft_as_is=n_unfixed,
                                          peft_fixed=len(get_peft_model_state_dict(pm, state_dict=sd)))
        del sd
        t2 = time.time()
        # FULL_STATE_DICT (the CPU config): every rank takes part in the gather, rank 0 writes adapter_model.safetensors
        tr.save_model(str(out/"adapter"))
        tok.save_pretrained(str(out/"adapter")) if rank == 0 else None
        R.update(adapter=str(out/"adapter"), save_s=time.time() - t2, per_rank=per_rank,
                 finetune_save_adapter_skipped=skipped_save,
                 state_dict_type=str(tr.accelerator.state.fsdp_plugin.state_dict_type),
                 fsdp_version=tr.accelerator.state.fsdp_plugin.fsdp_version,
                 use_orig_params=tr.accelerator.state.fsdp_plugin.use_orig_params,
                 sync_module_states=tr.accelerator.state.fsdp_plugin.sync_module_states,
                 forwards=[r["forwards"] for r in per_rank])
        dist.barrier()
    if rank == 0: (out/"worker.json").write_text(json.dumps(R, indent=1, default=str))

def _rss() -> int:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def _checkpoint_tensors(run:Path) -> dict:
    "Tensors in the newest checkpoint's adapter files (finetune writes one when training ends)."
    import torch
    from safetensors.torch import load_file
    cks = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not cks: return {}
    out = dict(checkpoint=cks[-1].name)
    if (f := cks[-1]/"adapter_model.safetensors").exists(): out["adapter_model.safetensors"] = len(load_file(str(f)))
    if (f := cks[-1]/"pytorch_model_fsdp.bin").exists():
        out["pytorch_model_fsdp.bin"] = len(torch.load(str(f), map_location="cpu", weights_only=True))
    return out

# ----------------------------------------------------------------------------------------------------------------------
# orchestrator

def _port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _launch(config, worker_args:list, n:int=2, timeout:int=900) -> tuple:
    cmd = [str(VENV_BIN/"accelerate"), "launch", "--config_file", str(config), "--num_processes", str(n),
           "--main_process_port", str(_port()), str(HERE)] + worker_args
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t, " ".join(c if c != str(HERE) else "nbs/benchmarks/fsdp_cpu.py" for c in cmd)

def _last_error(text:str) -> str:
    lines = [l.split("]: ", 1)[-1] for l in text.splitlines() if "Error" in l and ":" in l and "File " not in l
             and "ChildFailedError" not in l]
    return lines[-1].strip()[:300] if lines else ""

def probes(R):
    say("\n## 0. What accelerate does with FSDP on this CPU machine (2 processes, gloo)")
    rows = []
    for name, cfg, extra in [("accelerate_fsdp.yaml (shipped, GPU)", SHIPPED_CONFIG, []),
                             ("accelerate_fsdp_cpu.yaml, accelerate as is", CPU_CONFIG, []),
                             ("accelerate_fsdp_cpu.yaml + cpu_fsdp_patches", CPU_CONFIG, ["--patch"])]:
        p, s, _ = _launch(cfg, ["--worker", "probe", "--config-name", name, "--state-dict"] + extra, timeout=300)
        got = [json.loads(l[6:]) for l in p.stdout.splitlines() if l.startswith("PROBE ")]
        r = got[0] if got else dict(config=name, error=_last_error(p.stdout + p.stderr) or f"rc={p.returncode}")
        r["seconds"] = round(s, 1)
        rows.append(r)
        say(f"- {name}: " + (f"ERROR {r['error']}" if "error" in r else
                               f"distributed_type={r['distributed_type']}, processes={r['num_processes']}, "
                               f"device={r['device']}, FSDP plugin kept={r['fsdp_plugin']}"
                               + (f"; FSDP1 full state dict (tiny model): {r['full_state_dict']}"
                                  if "full_state_dict" in r else "")))
    # torch's to_cpu bug alone: the patched accelerate state, the original FlatParamHandle.to_cpu
    p, s, _ = _launch(CPU_CONFIG, ["--worker", "probe", "--config-name", "patched accelerate, torch to_cpu as is",
                                   "--state-dict", "--patch", "--no-torch-fix"], timeout=300)
    got = [json.loads(l[6:]) for l in p.stdout.splitlines() if l.startswith("PROBE ")]
    if got:
        rows.append(got[0] | dict(seconds=round(s, 1)))
        say(f"- accelerate patched, torch's FlatParamHandle.to_cpu as is: FSDP1 full state dict (tiny model): "
            f"{got[0].get('full_state_dict')}")
    R["probes"] = rows

def _table(rows, head):
    say("| " + " | ".join(head) + " |"); say("|" + "---|" * len(head))
    for r in rows: say("| " + " | ".join(str(x) for x in r) + " |")

def fsdp2_config(work:Path) -> Path:
    "accelerate_fsdp_cpu.yaml with fsdp_version 2 (its FSDP1-only keys dropped): written to the work folder."
    drop = ("fsdp_backward_prefetch", "fsdp_forward_prefetch", "fsdp_sharding_strategy", "fsdp_sync_module_states",
            "fsdp_use_orig_params")
    lines = [l.replace("fsdp_version: 1", "fsdp_version: 2") for l in CPU_CONFIG.read_text().splitlines()
             if not l.strip().startswith(drop)]
    p = work/"accelerate_fsdp2_cpu.yaml"
    p.write_text("\n".join(lines + ["  fsdp_reshard_after_forward: true"]) + "\n")
    return p

def report_fsdp(label, F, R):
    say(f"\n### {label}: {F['world_size']} processes, distributed_type={F['distributed_type']}, model wrapped in "
        f"{F['wrapped']}, FSDP version {F['fsdp_version']}, use_orig_params={F['use_orig_params']}, "
        f"sync_module_states={F['sync_module_states']}, state dict {F['state_dict_type']}")
    say(f"load {F['load_s']:.0f} s, train {F['train_s']:.0f} s ({F['steps']} steps), adapter save (gather + write) "
        f"{F['save_s']:.1f} s; finetune's own rank-0-only save_adapter skipped: {F['finetune_save_adapter_skipped']}")
    say(f"4-bit quant storage (load_model under accelerate's FSDP): {F['quant_storage']}")
    k = F.get("peft_adapter_keys", {})
    say(f"adapter tensors peft finds in the gathered full state dict ({k.get('full_state_dict_keys')} keys): "
        f"{k.get('peft_as_is')} with peft {R['versions']['peft']} as is, {k.get('peft_fixed')} with the name fix "
        f"(peft_fsdp_save_fix)")
    same_init = len({r["lora_init"] for r in F["per_rank"]}) == 1
    say(f"LoRA initial weights identical on every rank (needed: sync_module_states is off on the CPU): {same_init}")
    units = F["per_rank"][0]["units"]
    by_cls = {}
    for u in units: by_cls.setdefault(u["cls"], []).append(u)
    say(f"\nFSDP-wrapped modules: {len(units)} units")
    _table([(c, len(us), us[0]["name"], us[-1]["name"]) for c, us in by_cls.items()],
           ["wrapped class", "units", "first", "last"])
    big = [u for u in units if set(u["full"]) - {"lora"}]
    say(f"\nThe {len(big)} units that hold more than LoRA weights (the others hold only LoRA weights, or no "
        f"parameter of their own):")
    _table([(u["name"], u["cls"], u["params"], u["dtype"], f"{u['full'].get('4bit_packed', 0):,}",
             f"{u['full'].get('other', 0):,}", f"{u['full'].get('lora', 0):,}",
             " / ".join(f"{sum(r['units'][i]['local'].values()):,}" for r in F["per_rank"]))
            for i, u in enumerate(units) if u in big],
           ["unit", "class", "params", "dtype", "4-bit packed B", "other B", "LoRA B", "local B per rank"])
    say("\nBytes of local shards per rank (after training, resharded) vs unsharded:")
    kinds = ["4bit_packed", "other", "lora"]
    full = {k: sum(u["full"].get(k, 0) for u in units) for k in kinds}
    rows, shares = [], {}
    for r in F["per_rank"]:
        loc = {k: sum(u["local"].get(k, 0) for u in r["units"]) for k in kinds}
        storage = sum(u["storage"] for u in r["units"])
        rows.append((f"rank {r['rank']}", *(f"{loc[k]:,}" for k in kinds), f"{sum(loc.values()):,}", f"{storage:,}",
                     f"{sum(loc.values()) / sum(full.values()):.4f}", f"{r['quant_state_bytes']:,}",
                     f"{r['rss'] / 2**20:.0f} / {r['peak_rss'] / 2**20:.0f} MiB"))
        shares[r["rank"]] = dict(local=loc, total=sum(loc.values()), storage=storage,
                                 share=sum(loc.values()) / sum(full.values()), quant_state=r["quant_state_bytes"],
                                 rss=r["rss"], peak_rss=r["peak_rss"])
    rows.append(("unsharded", *(f"{full[k]:,}" for k in kinds), f"{sum(full.values()):,}", "", "1", "", ""))
    _table(rows, ["", "4-bit packed (fp32 storage) B", "other (embeddings, norms) B", "LoRA B", "total B",
                  "shard storage B (incl. padding)", "share of unsharded", "quant_state B (replicated)",
                  "RSS now / peak"])
    b = F["bytes_before"]
    say(f"Before FSDP (one process's full model): 4-bit packed {b.get('4bit_packed', 0):,} B, other "
        f"{b.get('other', 0):,} B, LoRA {b.get('lora', 0):,} B (equal to the unsharded row: "
        f"{all(b.get(k, 0) == full[k] for k in kinds)})")
    say(f"finetune's end-of-training checkpoint (Trainer's FSDP save, with peft_fsdp_save_fix in place): "
        f"{F.get('checkpoint')} tensors")
    R[label] = dict(checkpoint=F.get("checkpoint"), units=len(units),
                    units_by_class={c: len(us) for c, us in by_cls.items()},
                    decoder_layer_units=[u["name"] for u in units if u["cls"].endswith("DecoderLayer")],
                    big_units=[dict(name=u["name"], cls=u["cls"], full=u["full"]) for u in big],
                    unsharded=full, per_rank=shares, same_lora_init=same_init, quant_storage=F["quant_storage"],
                    config=dict(fsdp_version=F["fsdp_version"], use_orig_params=F["use_orig_params"],
                                sync_module_states=F["sync_module_states"], state_dict_type=F["state_dict_type"]),
                    load_s=F["load_s"], train_s=F["train_s"], save_s=F["save_s"], command=F.get("command"),
                    finetune_save_adapter_skipped=F["finetune_save_adapter_skipped"],
                    peft_adapter_keys=F.get("peft_adapter_keys"))

def compare_losses(Rf, runs:dict, R, key:str="loss", title:str="## 3. Loss per step"):
    bs = Rf["settings"]["batch_size"]
    say(f"\n{title}: 1 process (micro-batch {bs} x grad_accum 2) vs FSDP (micro-batch {bs} x 2 processes); "
        f"global batch {2 * bs}, seed {Rf['settings']['seed']}, {Rf['settings']['optimizer']}, same data order "
        f"(checked by a hash of each micro-batch's input ids)")
    ref_fw, labels = Rf["forwards"][0], list(runs)
    rows, out = [], {l: dict(diffs=[], same=[]) for l in labels}
    for i, a in enumerate(Rf["losses"]):
        ref_hash = [x[0] for x in ref_fw[2 * i:2 * i + 2]]
        row = [a["step"], f"{a['loss']:.6f}"]
        for l in labels:
            F = runs[l]
            b = F["losses"][i] if i < len(F["losses"]) else None
            f0, f1 = F["forwards"]
            same = ref_hash == [f0[i][0] if i < len(f0) else None, f1[i][0] if i < len(f1) else None]
            d = abs(a["loss"] - b["loss"]) if b else float("nan")
            out[l]["diffs"].append(d); out[l]["same"].append(same)
            row += [f"{b['loss']:.6f}" if b else "-", f"{d:.1e}", "yes" if same else "NO"]
        rows.append(row + ["/".join(ref_hash)])
    _table(rows, ["step", "loss 1 process"] + sum(([f"loss {l}", f"|diff| {l}", f"same batches {l}"] for l in labels),
                                                  []) + ["micro-batches (input-id hashes)"])
    R[key] = dict(tolerance=LOSS_TOL, optimizer=Rf["settings"]["optimizer"], ref=[a["loss"] for a in Rf["losses"]],
                     ref_grad_norm=[a["grad_norm"] for a in Rf["losses"]])
    for l in labels:
        d = out[l]["diffs"]
        mx = max(d) if d else float("nan")
        ok = bool(d) and mx <= LOSS_TOL and len(runs[l]["losses"]) == len(Rf["losses"]) == Rf["steps"]
        say(f"{l}: max |loss diff| = {mx:.3e} over {len(d)} steps (tolerance {LOSS_TOL:g}): {'PASS' if ok else 'FAIL'};"
            f" same micro-batches every step: {all(out[l]['same'])}; grad norms max |diff| "
            f"{max(abs(a['grad_norm'] - b['grad_norm']) for a, b in zip(Rf['losses'], runs[l]['losses'])):.3e}")
        R[key][l] = dict(losses=[b["loss"] for b in runs[l]["losses"]], diffs=d, max_diff=mx, pass_=ok,
                            grad_norm=[b["grad_norm"] for b in runs[l]["losses"]], same_batches=all(out[l]["same"]))

def compare_adapters(ref_dir, dirs:dict, R):
    import torch
    from safetensors.torch import load_file
    from peft import PeftModel
    from transformers.utils import logging as tlog
    from lowbudget_ft.loading import load_model
    from lowbudget_ft.complaints import load_complaints
    tlog.disable_progress_bar()
    say("\n## 4. The saved adapters loaded with plain peft (PeftModel.from_pretrained on the 4-bit base)")
    a = load_file(str(Path(ref_dir)/"adapter_model.safetensors"))
    R["adapter"] = dict(tolerance=LOGIT_TOL)
    for l, d in dirs.items():
        b = load_file(str(Path(d)/"adapter_model.safetensors"))
        same_keys = set(a) == set(b)
        wdiff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b), default=float("nan"))
        nbytes = (Path(d)/"adapter_model.safetensors").stat().st_size
        say(f"{l} adapter file: {len(b)} tensors ({nbytes:,} B) vs {len(a)} from 1 process; same keys: {same_keys}; "
            f"max |weight diff| {wdiff:.3e} (largest weight {max(float(v.abs().max()) for v in a.values()):.3e})")
        R["adapter"][l] = dict(tensors=len(b), file_bytes=nbytes, same_keys=same_keys, max_weight_diff=wdiff)
    base, tok = load_model("smollm2", check_fit=False)
    model = PeftModel.from_pretrained(base, ref_dir, adapter_name="one_process")
    for l, d in dirs.items(): model.load_adapter(d, adapter_name=l)
    model.eval()
    texts = list(load_complaints("test").complaint.head(4))
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    keep = enc["attention_mask"].bool()
    out = {}
    with torch.no_grad():
        for name in ["one_process"] + list(dirs):
            model.set_adapter(name)
            out[name] = model(**enc).logits[keep].float()
        with model.disable_adapter(): out["base"] = model(**enc).logits[keep].float()
    scale = float(out["one_process"].abs().max())
    d_base = float((out["one_process"] - out["base"]).abs().max())
    say(f"{len(texts)} fixed inputs (the first test complaints, up to 64 tokens): {int(keep.sum())} positions, "
        f"largest |logit| {scale:.1f}; for scale, 1-process adapter vs no adapter: max |diff| {d_base:.3f}")
    for l in dirs:
        d = float((out["one_process"] - out[l]).abs().max())
        agree = float((out["one_process"].argmax(-1) == out[l].argmax(-1)).float().mean())
        ok = d <= LOGIT_TOL
        say(f"{l} adapter vs 1-process adapter: max |logit diff| = {d:.3e} (tolerance {LOGIT_TOL:g}): "
            f"{'PASS' if ok else 'FAIL'}; argmax agreement {agree:.1%}")
        R["adapter"][l].update(max_logit_diff=d, pass_=ok, argmax_agreement=agree)
    R["adapter"].update(positions=int(keep.sum()), largest_logit=scale, trained_vs_base_max_diff=d_base)

def run_pair(a, work:Path, R:dict, steps:int, optimizer:str, tag:str, ref_title:str, fsdp_title, report:bool):
    "The 1-process reference and the FSDP runs (each version in --fsdp-versions) with these steps and optimizer."
    value = lambda k: optimizer if k == "optimizer" else getattr(a, k)
    common = ["--steps", str(steps)] + sum((["--" + k.replace("_", "-"), str(value(k))] for k in SETTINGS), [])
    say(f"\n{ref_title}")
    cmd = [sys.executable, str(HERE), "--worker", "ref", "--out", str(work/tag/"ref")] + common
    t = time.time()
    pr = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    cmdline = " ".join(["python", "nbs/benchmarks/fsdp_cpu.py"] + [str(c) for c in cmd[2:]]).replace(str(work), "$WORK")
    say(f"1 process command: {cmdline}")
    R.setdefault("runs", {})[f"{tag}/ref"] = r = dict(command=cmdline)
    Rf = json.loads((work/tag/"ref"/"worker.json").read_text()) if pr.returncode == 0 else None
    if Rf is None:
        r["failed"] = _last_error(pr.stdout + pr.stderr) or f"rc={pr.returncode}"
        say(f"reference run FAILED: {r['failed']}")
        (work/f"{tag}_ref_log.txt").write_text(pr.stdout + pr.stderr)
    else:
        say(f"{Rf['steps']} steps, wall {time.time() - t:.0f} s (load {Rf['load_s']:.0f} s, train "
            f"{Rf['train_s']:.0f} s), distributed_type={Rf['distributed_type']}, quant storage "
            f"{Rf['quant_storage']}, adapter saved by finetune; RSS now / peak {Rf['rss'] / 2**20:.0f} / "
            f"{Rf['peak_rss'] / 2**20:.0f} MiB")
        r.update(load_s=Rf["load_s"], train_s=Rf["train_s"], distributed_type=Rf["distributed_type"],
                 quant_storage=Rf["quant_storage"], rss=Rf["rss"], peak_rss=Rf["peak_rss"])
    if fsdp_title: say(f"\n{fsdp_title}")
    runs = {}
    for v in [int(x) for x in a.fsdp_versions.split(",") if x.strip()]:
        label = f"FSDP{v}"
        cfg = CPU_CONFIG if v == 1 else fsdp2_config(work)
        pf, s, cmdline = _launch(cfg, ["--worker", "fsdp", "--out", str(work/tag/label)] + common, timeout=1800)
        cmdline = cmdline.replace(str(work), "$WORK")
        say(f"\n{label} command: {cmdline} (wall {s:.0f} s, rc {pf.returncode})")
        R["runs"][f"{tag}/{label}"] = r = dict(command=cmdline, wall_s=s)
        wj = work/tag/label/"worker.json"
        if pf.returncode or not wj.exists():
            r["failed"] = _last_error(pf.stdout + pf.stderr) or f"rc={pf.returncode}"
            say(f"{label} run FAILED: {r['failed']}")
            (work/f"{tag}_{label}_log.txt").write_text(pf.stdout + pf.stderr)
            continue
        F = json.loads(wj.read_text()); F["command"] = cmdline
        r.update(train_s=F["train_s"], steps=F["steps"])
        if report: report_fsdp(label, F, R)
        runs[label] = F
    return Rf, runs

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["ref", "fsdp", "probe"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fsdp-versions", default="1,2",
                   help="FSDP versions to run (the CPU config is FSDP1; 2 is derived from it)")
    p.add_argument("--default-optimizer-steps", type=int, default=3,
                   help="then this many steps with paged_adamw_8bit, the library's default optimizer (0: skip)")
    p.add_argument("--out", default="nbs/benchmarks/results/fsdp_cpu")
    p.add_argument("--work", default=None, help="folder for runs and adapters (default: a new temporary folder)")
    p.add_argument("--no-probes", action="store_true")
    p.add_argument("--patch", action="store_true"); p.add_argument("--no-torch-fix", action="store_true")
    p.add_argument("--state-dict", action="store_true"); p.add_argument("--config-name", default="")
    for k, v in SETTINGS.items(): p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args()
    if a.worker == "probe":
        if a.patch and a.no_torch_fix:
            from torch.distributed.fsdp._flat_param import FlatParamHandle
            orig = FlatParamHandle.to_cpu
            cpu_fsdp_patches()
            FlatParamHandle.to_cpu = orig
            a.patch = False  # the AcceleratorState patch stays in place (probe reports it from --no-torch-fix)
        return probe(a)
    if a.worker: return train_worker(a)
    import torch, transformers, peft, accelerate, bitsandbytes
    t0, R = time.time(), {}
    work = Path(a.work or tempfile.mkdtemp(prefix="fsdp-cpu-")); work.mkdir(parents=True, exist_ok=True)
    git = lambda *c: subprocess.run(["git", *c], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "lowbudget_ft"))
    R["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                         accelerate=accelerate.__version__, bitsandbytes=bitsandbytes.__version__,
                         python=sys.version.split()[0], lowbudget_ft_commit=rev,
                         lowbudget_ft_working_tree_modified=dirty)
    R["settings"] = dict(steps=a.steps, **{k: getattr(a, k) for k in SETTINGS}, packing=True,
                         gradient_checkpointing=False, threads_per_process=1)
    say(f"# fsdp_cpu: FSDP-QLoRA through accelerate on the CPU, SmolLM2-135M-Instruct 4-bit NF4 + LoRA r{a.rank}, "
        f"{a.steps} steps, max_seq_len {a.max_seq_len}, packing, global batch {2 * a.batch_size}, lr {a.lr:g}, "
        f"{a.optimizer}, LoRA dropout {a.dropout:g}, gradient checkpointing off, 1 thread per process")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in R["versions"].items()) + f"; {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f} at start")
    if not a.no_probes: probes(R)
    Rf, runs = run_pair(a, work, R, a.steps, a.optimizer, "main", "## 1. Reference: one process",
                        "## 2. FSDP: two processes (accelerate launch)", report=True)
    if Rf and runs:
        compare_losses(Rf, runs, R)
        compare_adapters(Rf["adapter"], {l: F["adapter"] for l, F in runs.items()}, R)
    if a.default_optimizer_steps and a.optimizer != "paged_adamw_8bit":
        t = "## 5. The library's default optimizer, paged_adamw_8bit (bitsandbytes), under FSDP"
        Rf8, runs8 = run_pair(a, work, R, a.default_optimizer_steps, "paged_adamw_8bit", "opt8",
                              f"{t}: {a.default_optimizer_steps} steps", None, report=False)
        if Rf8 and runs8: compare_losses(Rf8, runs8, R, key="loss_paged_adamw_8bit", title="Loss per step")
    R["wall_s"] = time.time() - t0
    say(f"\nwall time, whole script: {R['wall_s']:.0f} s (load average {os.getloadavg()[0]:.1f} at the end)")
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    out.with_suffix(".json").write_text(json.dumps(R, indent=2, default=str))
    if not a.work: shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
