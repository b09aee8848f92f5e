"""The `fastft` command line: parse, then delegate.

Heavy libraries (torch, transformers, unsloth) are imported inside the command that
needs them, so `fastft --help` is instant and Unsloth is imported only when chosen.
Bad input raises `FastftError`, printed here as one paragraph with exit code 2.
"""

from __future__ import annotations

import sys
import textwrap

import click

from fastft.errors import FastftError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fastft")
def cli():
    """fastft: LoRA/QLoRA fine-tuning from one TOML recipe, on the Unsloth or Hugging Face stack."""


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
def run(recipe, backend, overrides, output, resume, overwrite):
    """Fine-tune as the RECIPE says and save the LoRA adapter.

    \b
    Example (CPU, offline, about a minute):
        fastft run recipes/quickstart.toml
        fastft run recipes/fusion_fr.toml --backend unsloth --set train.max_steps=60
    """
    from fastft.train import run as run_recipe

    run_recipe(recipe, backend=backend, overrides=overrides, output=output, resume=resume, overwrite=overwrite,
               echo=click.echo)


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
    from fastft.data import prepare
    from fastft.models import load_tokenizer
    from fastft.recipe import load_recipe
    from fastft.train import describe_data, describe_padding

    r = load_recipe(recipe, overrides)
    tokenizer = load_tokenizer(r.model)
    data = prepare(r, tokenizer, echo=click.echo)
    for i, pieces in enumerate(data.previews[:examples], start=1):
        click.echo(click.style(f"--- example {i}", bold=True))
        click.echo("".join(click.style(f"«{t}»", fg="green") if loss else t for t, loss in pieces))
    click.echo(describe_data(data, r))
    click.echo(describe_padding(data, r, tokenizer))
    click.echo(f"recipe OK: {recipe}")


def main():
    """Console entry point: user errors become one paragraph and their exit code, without a traceback."""
    try:
        cli.main(standalone_mode=False)
    except FastftError as e:
        message = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
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
