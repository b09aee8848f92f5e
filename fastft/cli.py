"""The `fastft` command line: parse, then delegate.

Heavy libraries (torch, transformers, unsloth) are imported inside the command that
needs them, so `fastft --help` is instant and Unsloth is imported only when chosen.
Bad input raises `FastftError`, printed here as one paragraph with exit code 2.
"""

from __future__ import annotations

import os
import sys
import textwrap

import click

from fastft.distributed import leave_process_group
from fastft.errors import FastftError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fastft")
def cli():
    """fastft: LoRA/QLoRA fine-tuning from one TOML recipe, on the Unsloth or Hugging Face stack."""
    from fastft.noise import install

    install()  # third-party lines no user can act on (fastft/noise.py lists them)


set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a recipe value (typed as in TOML); repeatable.")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["hf", "unsloth"]), default="hf", show_default=True,
              help="Training stack: hf (transformers+PEFT+TRL, anywhere) or unsloth (NVIDIA GPU).")
@set_option
@click.option("--output", type=click.Path(file_okay=False), help="Run folder (default: train.output_dir or outputs/<recipe>).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its last complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in the output folder.")
@click.option("--gpu-memory", type=click.FloatRange(min=1), metavar="GiB",
              help="Plan the recipe's \"auto\" settings for this much GPU memory instead of what is free.")
@click.option("--allow-pickle", is_flag=True,
              help="Load model or checkpoint weights stored as pickle (.bin/.pt), which can run code; "
                   "for trusted files only.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine, one per GPU: N > 1 runs this command under "
                   "`torchrun --standalone --nproc-per-node N`. Several machines: use torchrun itself.")
def run(recipe, backend, overrides, output, resume, overwrite, gpu_memory, allow_pickle, nproc):
    """Fine-tune as the RECIPE says and save the LoRA adapter.

    \b
    Example (CPU, offline, about a minute):
        fastft run recipes/quickstart.toml
        fastft run recipes/fusion_fr.toml --backend unsloth --set train.max_steps=60
        fastft run recipes/fusion_fr.toml --nproc 4          # 4 GPUs, data parallel
    """
    from fastft.distributed import under_launcher

    if nproc > 1 and not under_launcher():
        from fastft.train import launch

        launch(nproc, recipe, backend=backend, overrides=overrides, output=output, resume=resume,
               overwrite=overwrite, gpu_memory=gpu_memory, allow_pickle=allow_pickle)  # becomes torchrun
    from fastft.train import run as run_recipe

    run_recipe(recipe, backend=backend, overrides=overrides, output=output, resume=resume, overwrite=overwrite,
               echo=click.echo, gpu_memory=gpu_memory, allow_pickle=allow_pickle)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--gpu-memory", type=click.FloatRange(min=1), metavar="GiB",
              help="The GPU's memory. Default: what the GPU here has free; without a GPU, a 24 GiB card.")
@click.option("--backend", type=click.Choice(["hf", "unsloth"]), default="hf", show_default=True,
              help="The backend to plan for (they keep different activations).")
@set_option
def plan(recipe, gpu_memory, backend, overrides):
    """Predict peak GPU memory and speed of each setup for RECIPE, and pick the fastest that fits.

    The candidates split the global batch into micro-batch x accumulation, with gradient
    checkpointing off, on or offloaded, on a 4-bit or 16-bit base. Nothing is loaded.

    \b
    Example:
        fastft plan recipes/fusion_fr_auto.toml --gpu-memory 16 --set model.name=random:llama-3.1-8b
    """
    from fastft.plan_report import plan_command

    click.echo(plan_command(recipe, backend, overrides, gpu_memory))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--examples", default=2, show_default=True, help="How many formatted examples to show.")
def validate(recipe, overrides, examples):
    """Check a RECIPE and its data without training: formatted examples, lengths, steps, padding.

    The part of each example that carries the loss is shown «between guillemets» (and in green).

    \b
    Example:
        fastft validate recipes/fusion_fr.toml --set model.name=fastft:tiny
    """
    from fastft.batching import describe_data, describe_padding
    from fastft.data import prepare
    from fastft.models import load_tokenizer
    from fastft.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    tokenizer = load_tokenizer(r.model)
    data = prepare(r, tokenizer, echo=click.echo)
    for i, pieces in enumerate(data.previews[:examples], start=1):
        click.echo(click.style(f"--- example {i}", bold=True))
        click.echo("".join(click.style(f"«{t}»", fg="green") if loss else t for t, loss in pieces))
    click.echo(describe_data(data, r))
    click.echo(describe_padding(data, r))
    click.echo(f"recipe OK: {recipe}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist yet).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export(run_dir, out, overwrite):
    """Write a portable adapter folder from RUN_DIR: adapter, tokenizer, recipe, prompt template, manifest, card.

    \b
    Example (after `fastft run recipes/quickstart.toml`):
        fastft export outputs/quickstart --out exports/quickstart
    """
    from fastft.export import export as export_run

    export_run(run_dir, out, overwrite=overwrite, echo=click.echo)


@cli.command()
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist yet).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Precision of the merged weights; auto keeps the base checkpoint's own (never 4-bit).")
@click.option("--base", metavar="PATH_OR_ID", help="Where the base weights come from (default: the adapter's base model id).")
@click.option("--no-check", is_flag=True, help="Skip the fidelity check of the merged model against base+adapter.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--gguf", is_flag=True, help="Also write model.gguf with llama.cpp's converter ($LLAMA_CPP_DIR).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def merge(source, out, dtype, base, no_check, max_shard_size, gguf, overwrite):
    """Merge the LoRA adapter in SOURCE (run, adapter or export folder) into its base model.

    The base is loaded in 16-bit or fp32 on the CPU, never 4-bit. Afterwards the merged model
    is reloaded and compared with base+adapter on a few prompts; above the dtype's tolerance
    nothing is written and the exit code is 2.

    \b
    Example (after `fastft run recipes/quickstart.toml`):
        fastft merge outputs/quickstart --out outputs/quickstart-merged
        fastft merge outputs/fusion_fr --out merged/fusion_fr --dtype bf16 --base ~/models/Llama-3.2-1B-Instruct
    """
    from fastft.merge import merge as merge_adapter

    merge_adapter(source, out, dtype=dtype, base=base, check=not no_check, overwrite=overwrite,
                  max_shard_size=max_shard_size, gguf=gguf, echo=click.echo)


@cli.command()
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt; repeatable.")
@click.option("--file", "prompt_file", type=click.File("r", encoding="utf-8"),
              help="A text file of prompts, one per line (blank lines skipped); - reads stdin.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Stop after this many tokens at most.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy (reproducible); above 0 samples.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling.")
@click.option("--base", metavar="PATH_OR_ID", help="Where the base weights come from, for an adapter.")
def generate(source, prompts, prompt_file, max_new_tokens, temperature, top_p, seed, base):
    """Answer prompts with the model in SOURCE (run, adapter, export or merged folder).

    Each prompt is formatted with the recipe's template or chat template exactly as in
    training, and generation stops at the trained stop token. Only the answers are printed
    (one per prompt, in order), so the output can be piped.

    \b
    Example (after `fastft run recipes/quickstart.toml`):
        fastft generate outputs/quickstart --prompt "Qu'est-ce qu'un tokamak ?"
        fastft generate outputs/quickstart-merged --file questions.txt --temperature 0.7 --top-p 0.9
    """
    from fastft.generate import generate as answer

    texts = list(prompts) + ([line.rstrip("\r\n") for line in prompt_file if line.strip()] if prompt_file else [])
    if not texts:
        raise FastftError("Nothing to answer: give --prompt TEXT (repeatable) or --file FILE with one prompt per line.")
    for a in answer(source, texts, base=base, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed):
        click.echo(a.answer)


@cli.command(name="eval")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False),
              help="Examples in the recipe's data format (default: the recipe's eval data).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N examples  [default: all]")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder to write  [default: eval/ in the run, export or merged folder]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Stop each answer after this many tokens at most.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Examples per forward pass and per generation batch.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy (reproducible); above 0 samples.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling.")
@click.option("--base", metavar="PATH_OR_ID", help="Where the base weights come from (default: the recorded base model id).")
def evaluate(source, data, limit, out, overwrite, max_new_tokens, batch_size, temperature, top_p, seed, base):
    """Compare the fine-tuned model in SOURCE with its base model on held-out examples.

    SOURCE is a run, adapter, export or merged folder. For each example the prompt is
    formatted exactly as in training and both models answer it (the base is the adapter
    switched off, or the base model of a merged one). Reported for both: loss and perplexity
    on the reference answers, ROUGE-1/2/L F1, exact match, answer length. Writes eval.json,
    predictions.jsonl and eval.md.

    \b
    Example (after `fastft run recipes/tweetsumm.toml`):
        fastft eval outputs/tweetsumm
        fastft eval outputs/tweetsumm-merged --data more_conversations.jsonl --limit 50 --out eval/merged
    """
    from fastft.evaluation import evaluate as run_eval

    run_eval(source, data=data, limit=limit, out=out, overwrite=overwrite, base=base, max_new_tokens=max_new_tokens,
             batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed, echo=click.echo)


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--backends", default="unsloth,hf,hf-stock", show_default=True,
              help="Rows to run, comma-separated: unsloth, hf (fastft's fast path), hf-stock (the seed scripts' path).")
@click.option("--model", help="Base model instead of the recipe's, e.g. random:llama-3.1-8b.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per micro-batch (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(min=8),
              help="Synthetic row length, and data.max_length for the dataset workload (default: data.max_length).")
@click.option("--steps", type=click.IntRange(min=1),
              help="Timed steps per row  [default: 20; 5 on the CPU fallback]")
@click.option("--warmup", type=click.IntRange(min=1),
              help="Untimed warm-up steps per row  [default: 10; 2 on the CPU fallback]")
@click.option("--workload", type=click.Choice(["synthetic", "dataset"]), default="synthetic", show_default=True,
              help="synthetic: full rows of random tokens (kernel throughput); dataset: the recipe's data.")
@set_option
@click.option("--out", type=click.Path(dir_okay=False), help="Write FILE.json and, beside it, FILE.md and FILE.png.")
def bench(recipe, backends, model, batch_size, seq_len, steps, warmup, workload, overrides, out):
    """Measure each backend on the same RECIPE: tokens/s, step time, peak memory, MFU.

    Each backend row trains in its own fresh process; one that cannot run here is reported
    as unavailable. Without RECIPE, benchmarks/bench.toml (Llama-3.2-1B shape, 4-bit, LoRA
    r=16, batch 4 x 2048). With no GPU and no --model, it runs the tiny model on the CPU to
    test the harness.

    \b
    Example (CPU: about a minute; GPU: a few minutes):
        fastft bench --backends hf,hf-stock --out bench.json
        fastft bench --workload dataset --model random:llama-3.1-8b --batch-size 2
    """
    from fastft.bench import run_bench

    report = run_bench(recipe, backends=backends, model=model, batch_size=batch_size, seq_len=seq_len, steps=steps,
                       warmup=warmup, workload=workload, overrides=overrides, out=out, echo=click.echo)
    failed = [r["backend"] for r in report["rows"] if r["status"] == "error"]
    if failed:
        click.echo(f"error: {', '.join(failed)} failed (see above)", err=True)
        raise SystemExit(1)


def main():
    """Console entry point: user errors become one paragraph and their exit code, without a traceback."""
    try:
        cli.main(standalone_mode=False)
    except FastftError as e:
        message = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        label = "error: " if e.exit_code == 2 else "stopped: "
        rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        click.echo(rank + click.style(label, fg="red", bold=True) + message, err=True)
        if getattr(e, "command", ""):  # a command to copy, unwrapped on its own line
            click.echo("    " + e.command, err=True)
        leave_process_group()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
