"""Run `lowbudget-ft train` for the tests: `python launch_train.py CONFIG.yaml [--resume] [--set k=v ...]`.

Works under `torchrun`. Adds a callback that prints `rank R step N` after every optimizer step (the fault test
waits for these before killing the process) and writes `rank-R.json` (steps run by this process, world size)
into the run's output_dir at the end (the multi-process test reads these).
"""
import json, os, sys
from pathlib import Path
from lowbudget_ft.cli import train_command

class Progress:
    "Duck-typed `TrainerCallback`: one line per step, one file per rank at the end."
    def __init__(self): self.rank, self.steps = int(os.environ.get("RANK", 0)), 0
    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        print(f"rank {self.rank} step {state.global_step}", flush=True)
    def on_train_end(self, args, state, control, **kwargs):
        Path(args.output_dir, f"rank-{self.rank}.json").write_text(json.dumps(
            dict(rank=self.rank, steps=self.steps, global_step=state.global_step, world_size=args.world_size)))
    def __getattr__(self, name):
        if name.startswith("on_"): return lambda *a, **k: None
        raise AttributeError(name)

if __name__ == "__main__": sys.exit(train_command(sys.argv[1:], callbacks=[Progress()]))
