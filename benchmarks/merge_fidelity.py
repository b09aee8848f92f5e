"""The merge fidelity figures the README quotes for fp16 and bf16 (not a test).

A random-weight Llama-3.2-1B shape (`random:llama-3.2-1b`, 16-bit base), LoRA r=16 on every
linear layer, trained for 2 steps on the fusion Q&A so that the adapter moves the logits,
then merged with `fastft merge` in fp32, fp16 and bf16. Each merge's fidelity report (merged
model vs base+adapter, both run in fp32 on the check prompts) is written to
benchmarks/results/merge-fidelity.json; tests/test_export.py checks that the README quotes it.

    python benchmarks/merge_fidelity.py [--work DIR]

Runs on a CPU: about 10 GB of RAM; it took 70 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "merge-fidelity.json"
OVERRIDES = ("model.name=random:llama-3.2-1b", "model.quantization=16bit", "model.dtype=fp32", "lora.r=16",
             "lora.alpha=32", "lora.dropout=0.0", 'lora.target_modules="all-linear"', "lora.modules_to_save=[]",
             "data.max_length=128", "train.max_steps=2", "train.batch_size=1", "train.learning_rate=5e-3", "train.embedding_learning_rate=0",
             "train.gradient_checkpointing=false", "train.save_steps=0", "train.report_to=none", 'train.sample_prompt=""')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/fastft-merge-fidelity", help="folder for the run and the merges")
    args = parser.parse_args()
    from fastft.merge import merge
    from fastft.train import run

    work = Path(args.work)
    run_dir = run(str(ROOT / "recipes" / "fusion_fr.toml"), overrides=OVERRIDES, output=str(work / "run"),
                  overwrite=True)
    reports = {}
    for dtype in ("fp32", "fp16", "bf16"):
        out = merge(run_dir, work / f"merged-{dtype}", dtype=dtype, overwrite=True)
        reports[dtype] = json.loads((out / "fastft.json").read_text())["fidelity"]
    RESULT.write_text(json.dumps({"recipe": "recipes/fusion_fr.toml", "overrides": list(OVERRIDES),
                                  "fidelity": reports}, indent=2) + "\n")
    for dtype, r in reports.items():
        allowed = r["tolerance"] * max(1.0, r["max_abs_logit"])
        print(f"{dtype}: {r['max_abs_logit_diff']:.2g} / {allowed:.2g} allowed, greedy {r['greedy_agreement']:.0%}")


if __name__ == "__main__":
    main()
