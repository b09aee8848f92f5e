"""The end of `fastft run`: what the fine-tune changed, and where everything is.

After training, the sample prompt is answered twice, by the base model (adapter disabled)
and by the fine-tuned one, and the eval loss on held-out data is shown before training
(the untrained adapter, which leaves the base model unchanged) and after. `loss.png` plots
the run's losses. The last lines say where the adapter, summary and plot are, and what to
try next:

    eval loss on 13 held-out examples: 2.1570 before, 1.5210 after
    sample: "Qu'est-ce qu'un tokamak ?"
      base:       'Le tokamak est une chambre ...'
      fine-tuned: 'Le tokamak est une machine de confinement ...'
    adapter: outputs/quickstart/adapter
    ...
"""

from __future__ import annotations

import shlex
from pathlib import Path

SAMPLE_TOKENS = 100  # enough for a sentence from a byte-level model, a paragraph from a real one


def evaluate_at_end(trainer, eval_data: bool) -> None:
    """Evaluate once more unless the last evaluation was at the final step. Every process calls this."""
    if not eval_data or trainer.is_fsdp_enabled:
        return
    evals = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1] != trainer.state.global_step:
        trainer.evaluate()


def eval_losses(log_history: list) -> tuple[float | None, float | None]:
    """(before training, after training) eval losses from the trainer's log history.

    "Before" is the evaluation at step 0 (`eval_on_start`): LoRA starts with lora_B = 0, so
    the model evaluated there is exactly the base model.
    """
    evals = [h for h in log_history if "eval_loss" in h]
    before = next((h["eval_loss"] for h in evals if h["step"] == 0), None)
    after = evals[-1]["eval_loss"] if evals and evals[-1]["step"] > 0 else None
    return before, after


def sample_answers(model, tokenizer, recipe, data, max_new_tokens: int = SAMPLE_TOKENS) -> dict | None:
    """The sample prompt answered by the base model (adapter disabled) and by the fine-tuned model."""
    from fastft.generate import sample_answer

    tuned = sample_answer(model, tokenizer, recipe, data, max_new_tokens)
    if tuned is None:
        return None
    with model.disable_adapter():  # PEFT: LoRA layers and modules_to_save fall back to the base weights
        base = sample_answer(model, tokenizer, recipe, data, max_new_tokens)
    return {"prompt": tuned[0], "base": base[1], "fine_tuned": tuned[1]}


def write_loss_plot(log_history: list, path: Path, title: str) -> bool:
    """Plot training loss per logged step and eval loss (when there is eval data) to `path`.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no global state
    except ImportError:
        return False
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held out)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)  # never a half-written plot
    return True


def report_end_of_run(run_dir: Path, summary: dict, log_history: list, echo,
                      plot_written: bool) -> None:
    """Print the losses, the two answers, where everything is, and the next commands."""
    echo(f"loss: first {summary['first_loss']:.4f}, last {summary['final_loss']:.4f} (training batches)"
         if summary["first_loss"] is not None else "loss: no step was logged")
    before, after = eval_losses(log_history)
    if after is not None:
        n = summary["data"].get("eval_examples", 0)
        echo(f"eval loss on {n} held-out examples: "
             + (f"{before:.4f} before, {after:.4f} after" if before is not None else f"{after:.4f} after"))
    echo(f"throughput: {summary['train_tokens_per_second']} tokens/s over {summary['processes']} process(es), "
         f"{summary['train_tokens']:,} tokens in {summary['train_runtime_s']:.1f} s")
    sample = summary.get("sample")
    if sample:
        echo(f"sample: {sample['prompt']!r}\n  base:       {sample['base']!r}\n  fine-tuned: {sample['fine_tuned']!r}")
    run = shell_quote(str(run_dir))
    echo(f"adapter: {run_dir / 'adapter'}  ({summary['wall_time_s']:.0f} s)")
    echo(f"summary: {run_dir / 'fastft.json'}")
    echo(f"loss plot: {run_dir / 'loss.png'}" if plot_written
         else "loss plot: not written, matplotlib is not installed (pip install matplotlib)")
    prompt = shell_quote(sample["prompt"]) if sample else '"..."'
    echo("next:\n"
         f"  fastft generate {run} --prompt {prompt}\n"
         f"  fastft merge {run} --out {shell_quote(str(run_dir) + '-merged')}")


def shell_quote(text: str) -> str:
    """Quote for a POSIX shell, readably: "Qu'est-ce ?" rather than shlex's 'Qu'"'"'est-ce ?'."""
    quoted = shlex.quote(text)
    if quoted == text or "'" not in text or any(c in text for c in '"$`\\!'):
        return quoted
    return f'"{text}"'
