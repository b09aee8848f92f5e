"""Pretrain `fastft:tiny`, the embedded default model, on the fusion texts the project ships.

    python scripts/pretrain_tiny.py            # one CPU thread; 9 minutes on a busy shared 2-core machine
    python scripts/pretrain_tiny.py --check    # only print what the weights would be trained on

Why: LoRA on random weights learns little in a minute, so the quickstart's fine-tuned answer
stuttered ("Le de de de ..."). A base that already writes French lets a one-minute CPU fine-tune
visibly learn the Q&A format and style. The base sees only plain prose (recipes/data/text/);
never the Q&A pairs of recipes/data/fusion_fr.jsonl, so the quickstart's "before" is honest.

Seeded and run on the CPU with a fixed number of steps: rerunning it rebuilds the same weights
up to floating-point differences between machines. It writes fastft/assets/tiny/ (config,
safetensors weights, tokenizer files) and a small TRAINING.json saying how they were made.
The package never imports this script.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "recipes" / "data" / "text").glob("*.txt"))
OUT = ROOT / "fastft" / "assets" / "tiny"


def corpus_tokens(tokenizer) -> torch.Tensor:
    """All the text as one stream of byte tokens, one line per fact/paragraph, files joined by blank lines."""
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in CORPUS) + "\n"
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="print the corpus size and model shape, train nothing")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from fastft.models import ARCHITECTURES, build_tokenizer

    # One thread: the same sums in the same order on every machine (and on a busy 2-core machine,
    # several times faster than two threads competing with other processes).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    stream = corpus_tokens(tokenizer)
    shape = dict(ARCHITECTURES["tiny"], vocab_size=len(tokenizer))
    config = AutoConfig.for_model(
        shape.pop("model_type"), **shape, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, torch_dtype="float32",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(CORPUS)} files, {len(stream):,} byte tokens; model: {n_params:,} parameters")
    if args.check:
        return

    # Random windows of the stream; the generator makes the batch order part of the seed.
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(stream) - args.context - 1, (args.batch,), generator=gen)
        batch = torch.stack([stream[o:o + args.context + 1] for o in offsets.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # the model shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step}/{args.steps}  loss {recent:.3f}  ({time.time() - start:.0f} s)", flush=True)

    model.eval()
    prompt = tokenizer("Le tokamak", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=120, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("greedy continuation of 'Le tokamak':", repr(tokenizer.decode(out[0], skip_special_tokens=True)))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "TRAINING.json").write_text(json.dumps({
        "script": "scripts/pretrain_tiny.py",
        "corpus": [p.relative_to(ROOT).as_posix() for p in CORPUS],
        "corpus_tokens": len(stream), "parameters": n_params,
        "steps": args.steps, "batch": args.batch, "context": args.context, "learning_rate": args.lr, "seed": 0,
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
        "seconds": round(time.time() - start),
    }, indent=2) + "\n")
    print(f"saved in {args.out}")


if __name__ == "__main__":
    main()
