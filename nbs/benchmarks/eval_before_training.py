"""Evaluate before training, then train: the demo's settings with the "before" accuracy measured first.

Checks that running the 4-bit model in eval mode (generate) before training does not change how it trains: on CPUs
with AVX512-BF16, bitsandbytes would repack the 4-bit weights for inference and training would inherit that layout
(see 07_loading, "The training layout stays on the CPU"); `load_model` switches the repacking off.

Run:  OMP_NUM_THREADS=1 .venv/bin/python nbs/benchmarks/eval_before_training.py [--seed 0]
Prints the held-out accuracy before and after 200 steps; compare with `lowbudget-ft demo --seed N`.
"""
import argparse, sys, tempfile, warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from transformers import set_seed
from lowbudget_ft import cli
from lowbudget_ft.train import finetune, load_for_config


def main(seed:int):
    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser(); cli._demo_parser(p)
    a = p.parse_args(["--quiet", "--seed", str(seed)])
    name, train, test, labels = cli._demo_inputs(a)
    set_seed(a.seed)
    cfg = cli.demo_config(a, name, tempfile.mkdtemp())  # exactly the demo's run
    model, tok = load_for_config(cfg)
    before = cli._accuracy(model, tok, test, a, labels, a.eval_rows)  # generate() before any training
    res = finetune(model, tok, train[[a.prompt, a.response]], config=cfg)
    after = cli._accuracy(model, tok, test, a, labels, a.eval_rows)
    print(f"seed {seed}: accuracy measured before training {before.accuracy:.1%} -> after {res.steps} steps "
          f"{after.accuracy:.1%} (final train loss {res.history[-1]['loss']:.4f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args().seed)
