"""The ``spd`` command line: parses, calls the library, prints. No logic of its own."""
from __future__ import annotations

import json
import sys

import click

from ._version import __version__
from .errors import SpdError


class _Group(click.Group):
    """Turns SpdError (a user mistake) into a one-line message and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpdError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spd")
def cli():
    """Self-Policy Distillation: steer a model's own generations through a K/V capability
    subspace, then distill them into the unmodified model with LoRA."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def doctor(as_json):
    """Report versions, the native extension build, CUDA, and which models are installed."""
    from . import doctor as _doctor

    report = _doctor.collect()
    click.echo(json.dumps(report, indent=1) if as_json else _doctor.format_report(report))


@cli.command()
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Alias, transformers folder, .gguf file or hub id.")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda if available]")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
def chat(model, prompt, max_new_tokens, device, dtype):
    """Answer one prompt with a model (greedy), e.g. to check that it loads and runs."""
    from .models import load
    from .chat import answer

    mdl, tok = load(model, dtype=dtype, device=device)
    click.echo(answer(mdl, tok, prompt, max_new_tokens=max_new_tokens))


def main(argv=None):
    cli.main(args=argv, prog_name="spd")


if __name__ == "__main__":
    sys.exit(main())
