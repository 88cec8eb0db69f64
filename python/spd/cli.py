"""The ``spd`` command line: parses, calls the library, prints. No logic of its own."""
from __future__ import annotations

import json
import sys

import click

from ._signals import take_ctrl_c
from ._version import __version__
from .errors import SpdError


class _Group(click.Group):
    """Turns SpdError (a user mistake) into a one-line message and exit code 1, never a traceback;
    Ctrl-C (and SIGTERM, see ``main``) into exit code 130 (the shell's convention, which `bench/study.py` reads as "stop")."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpdError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; the same command resumes it", err=True)
            raise click.exceptions.Exit(130) from None


MODEL_OPTION = click.option("--model", "-m", default="smollm2-135m", show_default=True,
                            help="Alias, transformers folder, .gguf file or hub id.")
DEVICE_OPTION = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda if available]")
DTYPE_OPTION = click.option("--dtype", default="auto", show_default=True,
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
BF16_OPTION = click.option("--bf16/--no-bf16", default=None,
                           help="Train under bfloat16 autocast. [default: bf16 models on a GPU; float32 models "
                                "on CPUs with AMX or AVX512-BF16]")


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
@MODEL_OPTION
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@DEVICE_OPTION
@DTYPE_OPTION
def chat(model, prompt, max_new_tokens, device, dtype):
    """Answer one prompt with a model (greedy), e.g. to check that it loads and runs."""
    from .models import load
    from .chat import answer

    mdl, tok = load(model, dtype=dtype, device=device)
    click.echo(answer(mdl, tok, prompt, max_new_tokens=max_new_tokens))


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
@click.option("--against", type=click.Path(dir_okay=False), default=None,
              help="Another subspace file: show how much the two overlap per layer and K/V.")
def inspect(file, plot, against):
    """Show a subspace file: metadata, and per layer and K/V the rank, captured energy and spectrum
    (with --against, the overlap with another subspace instead)."""
    from .subspace import Subspace

    sub = Subspace.load(file)
    if against:
        click.echo(_overlap_table(sub.overlap(Subspace.load(against))))
        return
    click.echo(sub.describe())
    click.echo(_subspace_table(sub))
    if plot:
        from .report import plot_spectra

        plot_spectra(sub, plot)
        click.echo(f"wrote {plot}")


@cli.command()
@MODEL_OPTION
@click.option("--task", "-t", required=True, help="Task whose training prompts to complete.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Prompts (JSONL). [default: the task's train split in ../shared/data]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Corpus to write (JSONL); resumed if present.")
@click.option("--subspace", type=click.Path(dir_okay=False), default=None,
              help="Project K/V onto this subspace while generating (SPD). Without it: plain self-generation (PSR/SSD).")
@click.option("--backend", type=click.Choice(["hook", "fused", "fold"]), default=None,
              help="Projection backend. [default: fused when the extension is compiled, else hook]")
@click.option("--decoding", type=click.Choice(["greedy", "sample", "ssd"]), default="greedy", show_default=True)
@click.option("--temperature", type=float, default=None, help="Sampling temperature (sample/ssd).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (sample/ssd).")
@click.option("--top-k", type=int, default=None, help="Top-k truncation, 0 = off (sample/ssd).")
@click.option("--n-prompts", type=click.IntRange(1), default=None, help="A seeded subset of the prompts. [default: all]")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="[default: the task's]")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@DEVICE_OPTION
@DTYPE_OPTION
def generate(model, task, data, out, subspace, backend, decoding, temperature, top_p, top_k, n_prompts,
             max_new_tokens, batch_size, seed, device, dtype):
    """Phase 2: one completion per training prompt, optionally under K/V projection."""
    from .generate import Decoding, generate_corpus
    from .models import load
    from .subspace import Subspace
    from .tasks import get_task

    task_obj = get_task(task)
    dec = Decoding.make(decoding, temperature=temperature, top_k=top_k, top_p=top_p)
    sub = Subspace.load(subspace) if subspace else None
    if backend and sub is None:
        raise SpdError("--backend needs --subspace")
    examples = task_obj.load(data, n=n_prompts, seed=seed)
    mdl, tok = load(model, dtype=dtype, device=device)
    path = generate_corpus(mdl, tok, task_obj, examples, out, subspace=sub, backend=backend, decoding=dec,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, model_name=model)
    stats = json.loads(path.with_name(path.name + ".manifest.json").read_text())["stats"]
    click.echo(f"wrote {path}: {stats['n']} completions, mean {stats['mean_tokens']:.0f} tokens, "
               f"{stats['hit_cap']} hit the --max-new-tokens cap")


@cli.command()
@MODEL_OPTION
@click.option("--subspace", required=True, type=click.Path(dir_okay=False), help="Subspace file to fold in.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the folded checkpoint.")
@DEVICE_OPTION
@DTYPE_OPTION
def export(model, subspace, out, device, dtype):
    """Fold a subspace into the K/V weights: an ordinary checkpoint (transformers, vLLM, ...)."""
    from pathlib import Path

    from .models import load
    from .project import export_folded
    from .subspace import Subspace

    if Path(out).exists():
        raise SpdError(f"--out {out} already exists: choose a new folder")
    sub = Subspace.load(subspace)
    mdl, tok = load(model, dtype=dtype, device=device)
    export_folded(mdl, tok, sub, out)
    click.echo(f"wrote {out}: {model} with {len(sub.sites)} K/V projections folded in (load it with "
               "AutoModelForCausalLM.from_pretrained)")


@cli.command()
@MODEL_OPTION
@click.option("--corpus", "-c", required=True, type=click.Path(dir_okay=False), help="Corpus (JSONL) from `spd generate`.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder (adapter/, train.json, checkpoints/); an interrupted run there is resumed.")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-5, show_default=True)
@click.option("--lora-r", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lora-alpha", type=click.FloatRange(0, min_open=True), default=8.0, show_default=True)
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--target-modules", default=None,
              help="Comma-separated LoRA target modules. [default: the attention q/k/v/o projections]")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Per device.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=1024, show_default=True,
              help="Tokens per sequence; longer ones are cut from the right.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps.")
@click.option("--completion-only", is_flag=True, help="Loss on the completion tokens only (default: the whole sequence).")
@click.option("--drop-trivial", is_flag=True, help="Drop empty or one-line completions (the SSD baseline's filter).")
@click.option("--merge", is_flag=True, help="Also write a merged full model to OUT/merged.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass. [default: on a GPU only]")
@BF16_OPTION
@click.option("--save-steps", type=click.IntRange(1), default=100, show_default=True,
              help="Checkpoint every this many optimizer steps.")
@click.option("--micro-batch-size", type=click.IntRange(1), default=None,
              help="Examples per forward pass, gradients accumulated up to --batch-size (same optimizer steps). "
                   "[default: 1 on a CPU (no padding computed), --batch-size on a GPU]")
@click.option("--save-minutes", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Also checkpoint whenever this many minutes of training passed without one (one process).")
@DEVICE_OPTION
@DTYPE_OPTION
def train(model, corpus, out, epochs, lr, lora_r, lora_alpha, lora_dropout, target_modules, batch_size, grad_accum,
          max_length, max_steps, completion_only, drop_trivial, merge, seed, gradient_checkpointing, bf16,
          micro_batch_size, save_steps, save_minutes, device, dtype):
    """Phase 3: LoRA-distill the unmodified model on a corpus (resumes an interrupted run)."""
    from .models import load
    from .train import is_main_process, read_corpus, train as run_training, train_device

    read_corpus(corpus)  # input errors before the model loads
    mdl, tok = load(model, dtype=dtype, device=train_device(device))
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    result = run_training(mdl, tok, corpus, out, epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, target_modules=targets, batch_size=batch_size,
                          grad_accum=grad_accum, max_length=max_length, max_steps=max_steps,
                          completion_only=completion_only, drop_trivial=drop_trivial, merge=merge, seed=seed,
                          gradient_checkpointing=gradient_checkpointing, bf16=bf16, save_steps=save_steps,
                          micro_batch_size=micro_batch_size, save_minutes=save_minutes, model_name=model)
    if is_main_process():
        ex = result.info["examples"]
        dropped = ex["lines"] - ex["used"]
        click.echo(f"wrote {result.adapter_dir}: {ex['used']} examples ({dropped} dropped), "
                   f"{result.info.get('global_step')} steps, train loss {result.info.get('train_loss', float('nan')):.4f}"
                   + (f"; merged model in {result.merged_dir}" if result.merged_dir else ""))


@cli.command("eval")
@click.option("--task", "-t", required=True, help="Task to evaluate (gsm8k, svamp, mbpp, codealpaca, mmlu, bbh, ...).")
@click.option("--data", type=click.Path(), default=None,
              help="Evaluation examples (JSONL). [default: the task's test split in ../shared/data]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Results file to write (JSON).")
@click.option("--model", "-m", default=None, help="Model to evaluate: alias, transformers folder, .gguf file or hub id.")
@click.option("--adapter", type=click.Path(), default=None, help="A PEFT adapter folder to put on top of --model.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help='Score these completions (JSONL lines {"id", "completion"}) instead of a model.')
@click.option("--n-eval", type=click.IntRange(1), default=None,
              help="A seeded subset of this many examples. [default: the paper's size for the task]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="[default: the task's]")
@DEVICE_OPTION
@DTYPE_OPTION
def eval_(task, data, out, model, adapter, predictions, n_eval, seed, batch_size, max_new_tokens, device, dtype):
    """Evaluate a model (or score a predictions file) with the task's metric; write the results."""
    from .evaluate import format_score, run_eval

    result = run_eval(task, out, model=model, adapter=adapter, predictions=predictions, data=data, n=n_eval,
                      seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    click.echo(f"wrote {out}")
    click.echo(format_score(result))


@cli.command("run")
@MODEL_OPTION
@click.option("--task", "-t", required=True, help="Source task: its train prompts are completed and trained on.")
@click.option("--method", type=click.Choice(["spd", "psr", "ssd", "base"]), default="spd", show_default=True)
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False),
              help="Folder for every artifact; re-running the same command resumes.")
@click.option("--calib-task", default=None, help="Calibrate on another task (out-of-domain SPD).")
@click.option("--subspace", "subspace_file", type=click.Path(dir_okay=False), default=None,
              help="Use this subspace file instead of calibrating (spd), e.g. from `spd random-subspace`.")
@click.option("--eval-tasks", default="", help="More tasks to evaluate, comma-separated (the source task and its transfer task always).")
@click.option("--n-train", type=click.IntRange(1), default=None, help="Training prompts (seeded subset). [default: all]")
@click.option("--n-calibration", type=click.IntRange(1), default=50, show_default=True)
@click.option("--n-eval", type=click.IntRange(1), default=None, help="Evaluation examples per task. [default: the paper's]")
@click.option("--layers", default="last_mid", show_default=True)
@click.option("--rank", default="half", show_default=True)
@click.option("--project", "project_kinds", default="both", show_default=True, type=click.Choice(["both", "k", "v"]))
@click.option("--loss", default="aligned", show_default=True, type=click.Choice(["aligned", "full"]))
@click.option("--backend", type=click.Choice(["hook", "fused", "fold"]), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="Generation cap. [default: the task's]")
@click.option("--eval-max-new-tokens", type=click.IntRange(1), default=None, help="[default: the task's]")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Generation/eval batch.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--lora-r", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(1), default=8, show_default=True)
@click.option("--train-batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--completion-only", is_flag=True, help="Train on completion tokens only (default: the whole sequence).")
@BF16_OPTION
@click.option("--seed", type=int, default=42, show_default=True)
@DEVICE_OPTION
@DTYPE_OPTION
def run_cmd(model, task, method, workdir, calib_task, subspace_file, eval_tasks, n_train, n_calibration, n_eval, layers, rank,
            project_kinds, loss, backend, max_new_tokens, eval_max_new_tokens, batch_size, epochs, lr, lora_r,
            lora_alpha, train_batch_size, completion_only, bf16, seed, device, dtype):
    """The whole protocol: base eval, calibrate, generate, train, eval; resumable."""
    from .pipeline import RunConfig, run

    config = RunConfig(model=model, task=task, method=method, calib_task=calib_task, subspace=subspace_file,
                       eval_tasks=[t.strip() for t in eval_tasks.split(",") if t.strip()], n_train=n_train,
                       n_calibration=n_calibration, n_eval=n_eval, layers=layers, rank=rank, project=project_kinds,
                       loss=loss, backend=backend, max_new_tokens=max_new_tokens,
                       eval_max_new_tokens=eval_max_new_tokens, batch_size=batch_size, epochs=epochs, lr=lr,
                       lora_r=lora_r, lora_alpha=lora_alpha, train_batch_size=train_batch_size,
                       completion_only=completion_only, bf16=bf16, seed=seed, device=device, dtype=dtype)
    report = run(config, workdir, log=click.echo)
    click.echo(report.read_text())
    click.echo(f"report: {report}")


@cli.command()
@click.argument("workdirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Also write the table (markdown).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Bar chart of the accuracies (PNG).")
def report(workdirs, out, plot):
    """Compare `spd run` workdirs in one markdown table (and a bar chart)."""
    from pathlib import Path

    from .report import plot_runs, run_report

    text = run_report(workdirs)
    click.echo(text)
    if out:
        Path(out).write_text(text)
    if plot:
        plot_runs(workdirs, plot)
        click.echo(f"wrote {plot}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def rescore(paths):
    """Re-score saved evaluations from their completions with the current answer extraction.

    PATHS: result JSON files, `spd run` workdirs or folders of them. No model runs; only
    exact-match tasks (GSM8K, SVAMP, MMLU, BBH) are re-scored; changed files are rewritten
    atomically with the previous score under "rescored".
    """
    from pathlib import Path

    from .evaluate import rescore_file
    from .pipeline import rescore_tree

    changed = 0
    for path in map(Path, paths):
        if path.is_dir():
            changed += len(rescore_tree(path, log=click.echo))
        elif (got := rescore_file(path)) is not None:
            changed += 1
            click.echo(f"[rescore] {path}: {100 * got[0]:.1f} -> {100 * got[1]:.1f}")
    click.echo(f"{changed} evaluation file{'s' if changed != 1 else ''} changed")


@cli.group()
def bench():
    """Benchmarks: projection hook overhead, gradient capture, SVD, training steps (numbers, not tests)."""


def _bench_command(name, options, summary):
    def decorate(fn):
        fn = click.option("--quick", is_flag=True, help="Small sizes: finishes in under 2 minutes on a 2-core CPU.")(fn)
        fn = click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
                          help="Write the JSON here. [default: bench/results/<machine-tag>.json]")(fn)
        fn = click.option("--plot", is_flag=True, help="Also write a PNG chart next to the JSON.")(fn)
        fn = click.option("--readme", type=click.Path(dir_okay=False), default=None,
                          help="Markdown file whose table to refresh. [default: bench/README.md, "
                               "untouched with --out]")(fn)
        fn = DEVICE_OPTION(fn)
        fn = click.option("--tiny", is_flag=True, hidden=True)(fn)  # the smoke test's sizes
        for opt in options:
            fn = opt(fn)
        return bench.command(name, help=summary)(fn)
    return decorate


def _run_bench(name, quick, out, plot, readme, device, tiny, **kw):
    from .bench import main as run_bench

    ctx = click.get_current_context()
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}  # "ms" -> "--rows"
    command = ctx.command_path.split() + [
        flags[k] + ("" if v is True else f"={','.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in ctx.params.items() if v not in (None, False, ())]
    written = run_bench(name, quick=quick, out=out, plot=plot, readme=readme, device=device, tiny=tiny,
                        log=click.echo, command=command, **{k: v for k, v in kw.items() if v not in (None, ())})
    click.echo(f"wrote {written['json']}" + (f", {written['readme']}" if written["readme"] else "")
               + (f", {written['plot']}" if written["plot"] else ""))


def _csv(*names, allowed=None, ints=False, help=None):
    """A comma-separated list option: parsed (positive integers with ``ints``; names from
    ``allowed``) into a list, a bad item being a one-line usage error."""
    def parse(ctx, param, value):
        if value is None:
            return None
        items = [x.strip() for x in value.split(",") if x.strip()]
        if not items:
            raise click.BadParameter("give at least one value")
        if ints:
            try:
                numbers = [int(float(x)) for x in items]
            except ValueError:
                raise click.BadParameter(f"not a number in {value!r}") from None
            if min(numbers) < 1:
                raise click.BadParameter(f"sizes must be >= 1, got {value!r}")
            return numbers
        unknown = [x for x in items if allowed is not None and x not in allowed]
        if unknown:
            raise click.BadParameter(f"unknown {', '.join(unknown)}: use {', '.join(allowed)}")
        return items
    return click.option(*names, default=None, callback=parse, help=help)


@_bench_command("hooks", [
    _csv("--models", help="Comma-separated: default, qwen2.5-0.5b-shape, llama-3.1-8b-shape, or a model name/path."),
    _csv("--batches", ints=True, help="Comma-separated batch sizes."),
    click.option("--prompt-len", type=click.IntRange(1), default=None),
    click.option("--new-tokens", type=click.IntRange(2), default=None),
    click.option("--reps", type=click.IntRange(1), default=None, help="Measured repetitions (after 1 warm-up)."),
], "Decode-step latency and generate throughput: none vs hook, fused, fold (interleaved).")
def bench_hooks(quick, out, plot, readme, device, tiny, models, batches, prompt_len, new_tokens, reps):
    _run_bench("hooks", quick, out, plot, readme, device, tiny, models=models, batches=batches,
               prompt_len=prompt_len, new_tokens=new_tokens, reps=reps)


@_bench_command("capture", [
    click.option("--model", "-m", default=None,
                 help="A model name/path, or qwen2.5-0.5b-shape / llama-3.1-8b-shape (random weights, "
                      "synthetic examples). [default: the default model]"),
    click.option("--task", "-t", default=None, help="[default: gsm8k, or arith without data]"),
    click.option("--n", type=click.IntRange(1), default=None, help="Calibration examples. [default: 50]"),
    click.option("--reps", type=click.IntRange(1), default=None),
    click.option("--layers", default=None, help="[default: last_mid]"),
], "Calibration capture time and peak memory: plain retain_grad vs spd's Gram capture.")
def bench_capture(quick, out, plot, readme, device, tiny, model, task, n, reps, layers):
    _run_bench("capture", quick, out, plot, readme, device, tiny, model=model, task=task, n=n, reps=reps,
               layers=layers)


@_bench_command("svd", [
    _csv("--rows", "ms", ints=True, help="Comma-separated M values (1e4,1e5,1e6)."),
    _csv("--dims", "ds", ints=True, help="Comma-separated d values (128,512,1024,4096)."),
    _csv("--methods", allowed=("exact", "gram", "randomized", "svd_lowrank", "cupy"),
         help="Comma-separated: exact, gram, randomized, svd_lowrank, cupy."),
], "Exact vs gram vs randomized SVD: time, peak memory, largest principal angle.")
def bench_svd(quick, out, plot, readme, device, tiny, ms, ds, methods):
    _run_bench("svd", quick, out, plot, readme, device, tiny, Ms=ms, ds=ds, methods=methods)


@_bench_command("train", [
    click.option("--model", "-m", default=None, help="[default: the default model]"),
    click.option("--task", "-t", default=None, help="Prompts and gold completions from this task. [default: mbpp]"),
    click.option("--corpus", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Train on this corpus.jsonl's first records instead (e.g. a generated one)."),
    click.option("--steps", type=click.IntRange(1), default=None, help="Measured optimizer steps per run. [default: 5]"),
    click.option("--reps", type=click.IntRange(1), default=None, help="Repetitions; the first is warm-up. [default: 3]"),
    _csv("--variants", allowed=("padded", "micro", "micro_cast"), help="Comma-separated: padded, micro, micro_cast."),
], "LoRA training: seconds per optimizer step and peak memory per speed setting (interleaved).")
def bench_train(quick, out, plot, readme, device, tiny, model, task, corpus, steps, reps, variants):
    _run_bench("train", quick, out, plot, readme, device, tiny, model=model, task=task, corpus=corpus,
               steps=steps, reps=reps, variants=variants)


def _overlap_table(overlap) -> str:
    lines = ["layer  kv  overlap  chance"]
    for (layer, kind), (value, chance) in sorted(overlap.items()):
        lines.append(f"{layer:>5}  {kind.upper():>2}  {value:7.3f}  {chance:6.3f}")
    lines.append("overlap: mean squared cosine of the principal angles (1: one subspace holds the other, "
                 "0: orthogonal); chance: its expectation for uniformly random subspaces of these ranks")
    return "\n".join(lines)


@cli.command("random-subspace")
@click.argument("like", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Subspace file to write.")
@click.option("--seed", type=int, default=0, show_default=True)
def random_subspace(like, out, seed):
    """A control for SPD: random orthonormal bases with the layers, K/V sites and ranks of the
    subspace LIKE (for the same model), to generate with in its place."""
    from .subspace import Subspace

    Subspace.random_like(Subspace.load(like), seed=seed).save(out)
    click.echo(f"wrote {out}: a random subspace shaped like {like} (seed {seed})")


def _subspace_table(sub) -> str:
    lines = ["layer  kv     d  rank  energy  top singular values"]
    for row in sub.summary():
        energy = "   n/a" if row["energy"] is None else f"{row['energy']:6.3f}"
        top = " ".join(f"{v:.3g}" for v in row["top_singular_values"])
        lines.append(f"{row['layer']:>5}  {row['kind'].upper():>2}  {row['d']:>4}  {row['rank']:>4}  {energy}  {top}")
    return "\n".join(lines)


def main(argv=None):
    take_ctrl_c()  # `kill` stops a command like Ctrl-C: finished work kept, training checkpointed
    cli.main(args=argv, prog_name="spd")


if __name__ == "__main__":
    sys.exit(main())
