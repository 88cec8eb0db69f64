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


MODEL_OPTION = click.option("--model", "-m", default="smollm2-135m", show_default=True,
                            help="Alias, transformers folder, .gguf file or hub id.")
DEVICE_OPTION = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda if available]")
DTYPE_OPTION = click.option("--dtype", default="auto", show_default=True,
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]))


@cli.command()
@MODEL_OPTION
@click.option("--task", "-t", required=True, help="Task name (spd tasks: gsm8k, svamp, mbpp, ...).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Labelled examples (JSONL). [default: the task's train split in ../shared/data]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Subspace file to write (.safetensors).")
@click.option("--layers", default="last_mid", show_default=True, help="last_mid | all | comma-separated indices.")
@click.option("--rank", default="half", show_default=True, help="half | an integer | energy:<fraction>.")
@click.option("--project", default="both", show_default=True, type=click.Choice(["both", "k", "v"]))
@click.option("--loss", default="aligned", show_default=True, type=click.Choice(["aligned", "full"]))
@click.option("--svd", default="auto", show_default=True, type=click.Choice(["auto", "exact", "gram", "randomized"]))
@click.option("--n-calibration", default=50, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--dump-spans", type=click.Path(dir_okay=False), default=None,
              help="Write the used examples' input_ids and span positions (JSONL).")
@DEVICE_OPTION
@DTYPE_OPTION
def calibrate(model, task, data, out, layers, rank, project, loss, svd, n_calibration, seed, batch_size,
              dump_spans, device, dtype):
    """Phase 1: extract the K/V capability subspace from labelled examples."""
    from .calibrate import calibrate as run_calibration
    from .linalg import RankRule
    from .models import load
    from .tasks import get_task

    task_obj = get_task(task)
    RankRule.parse(rank)  # syntax errors before the model loads
    examples = task_obj.load(data)
    mdl, tok = load(model, dtype=dtype, device=device)
    sub = run_calibration(mdl, tok, examples, task=task_obj, layers=layers, rank=rank, project=project,
                          loss=loss, svd=svd, n_calibration=n_calibration, seed=seed,
                          batch_size=batch_size, dump_spans=dump_spans, model_name=model)
    sub.save(out)
    click.echo(_subspace_table(sub))
    click.echo(f"wrote {out} ({sub.metadata['n_examples']} examples, "
               f"{sub.metadata['n_skipped']} skipped: span not found)")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the singular value spectra (PNG).")
def inspect(file, plot):
    """Show a subspace file: metadata, and per layer and K/V the rank, captured energy and spectrum."""
    from .subspace import Subspace

    sub = Subspace.load(file)
    click.echo(sub.describe())
    click.echo(_subspace_table(sub))
    if plot:
        from .report import plot_spectra

        plot_spectra(sub, plot)
        click.echo(f"wrote {plot}")


def _subspace_table(sub) -> str:
    lines = ["layer  kv     d  rank  energy  top singular values"]
    for row in sub.summary():
        energy = "   n/a" if row["energy"] is None else f"{row['energy']:6.3f}"
        top = " ".join(f"{v:.3g}" for v in row["top_singular_values"])
        lines.append(f"{row['layer']:>5}  {row['kind'].upper():>2}  {row['d']:>4}  {row['rank']:>4}  {energy}  {top}")
    return "\n".join(lines)


def main(argv=None):
    cli.main(args=argv, prog_name="spd")


if __name__ == "__main__":
    sys.exit(main())
