"""The reproduction study in one command: every run of base, PSR, SSD and SPD (code, math, QA), the
out-of-domain row, the loss ablation, QA again with the training loss on the completions only
and SPD on math with a random subspace in place of the calibrated one (both beyond the paper;
`--no-completion-only-qa`, `--no-controls` leave them out), for each model; then docs/RESULTS.md
(between its study markers) and docs/results.png (the plot is named after --doc). Resumable: stop
it at any point and run the same command again.

    python bench/study.py                          # run (or resume) everything, refresh the document
    python bench/study.py --dry-run                # what is left: phases, time estimate, `spd run` command
    python bench/study.py --only qwen2.5-coder-0.5b/code --only smollm2-135m/math
    python bench/study.py --report                 # only refresh the document from finished runs

Before each refresh, finished exact-match evaluations are re-scored from their stored completions
(``spd rescore``), so a fix to answer extraction reaches every run without rerunning a model.

Runs are also kept in bench/results/study/ as their phases finish (tracked in git;
spd.study_archive): their manifests, scores, per-example evaluations, corpora, subspaces and LoRA
adapters, without checkpoints and with each prompt replaced by its hash; when the study is stopped,
also the work in progress (an unfinished training's newest checkpoint, an unfinished corpus or
evaluation's finished batches) until its phase finishes. On a new machine the study and --report
put them back into --root, so commit that folder as runs finish and when the study stops, and
nothing finished is lost with the machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "runs" / "study",
              show_default=True, help="Where the run folders live.")
@click.option("--models", default=",".join(("qwen2.5-coder-0.5b", "smollm2-135m")), show_default=True)
@click.option("--domains", default="code,math,qa", show_default=True)
@click.option("--n-train", type=click.IntRange(1), default=200, show_default=True)
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Generation/eval batch.")
@click.option("--train-precision", type=click.Choice(["bf16", "float32", "auto"]), default="bf16", show_default=True,
              help="Training's precision on every machine: bfloat16 autocast (the paper's, on GPUs), float32, or "
              "`spd train`'s default for the machine.")
@click.option("--completion-only-qa/--no-completion-only-qa", default=True, show_default=True,
              help="After the paper's protocol, train the QA runs again with the loss on the completions only.")
@click.option("--controls/--no-controls", default=True, show_default=True,
              help="After the paper's protocol, SPD on math with a random subspace of the calibrated one's shape.")
@click.option("--only", multiple=True, help="Only the runs whose '<model>/<key>' contains this (repeatable).")
@click.option("--dry-run", is_flag=True, help="List the runs, the phases each has left and an estimate of the time; run nothing.")
@click.option("--report", "report_only", is_flag=True, help="Only refresh the document from finished runs.")
@click.option("--archive", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "bench" / "results" / "study",
              show_default=True, help="Where runs are kept for git, without base weights, checkpoints or prompts; "
              "runs found there are put back into --root.")
@click.option("--no-archive", is_flag=True, help="Neither keep finished runs in --archive nor restore from it.")
@click.option("--doc", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "docs" / "RESULTS.md",
              show_default=True)
def main(root, models, domains, n_train, epochs, batch_size, train_precision, completion_only_qa, controls, only,
         dry_run, report_only, archive, no_archive, doc):
    from spd._signals import take_ctrl_c
    from spd.errors import SpdError
    from spd.pipeline import rescore_tree
    from spd.study import (
        StudySettings,
        archive_finished,
        collect,
        plot_scores,
        refresh_document,
        render,
        restore_archived,
        run_study,
    )

    settings = StudySettings(root=root, models=tuple(m for m in models.split(",") if m),
                             domains=tuple(d for d in domains.split(",") if d), n_train=n_train, epochs=epochs,
                             batch_size=batch_size, completion_only_qa=completion_only_qa, controls=controls,
                             train_bf16={"bf16": True, "float32": False, "auto": None}[train_precision],
                             archive=None if no_archive else archive)

    def report():
        restore_archived(settings, log=click.echo)  # a new machine: the finished runs come from git
        if settings.root.is_dir():  # finished evaluations follow the current answer extraction
            rescore_tree(settings.root, log=click.echo)
        archive_finished(settings, log=click.echo)
        collected = collect(settings)
        png = plot_scores(collected, doc.with_name(doc.stem.lower() + ".png"))  # RESULTS.md: results.png
        try:
            plot = png.relative_to(doc.parent).as_posix() if png else None
        except ValueError:
            plot = str(png)
        refresh_document(doc, render(collected, plot=plot))
        click.echo(f"[study] wrote {doc}")

    def report_in_child():
        """The refresh after each run, in a fresh process: a study runs for hours, and a fix to
        scoring or rendering made meanwhile should reach the document without a restart."""
        import subprocess

        args = [sys.executable, __file__, "--report", "--root", str(root), "--models", models, "--domains",
                domains, "--n-train", str(n_train), "--epochs", str(epochs), "--batch-size", str(batch_size),
                "--doc", str(doc), "--completion-only-qa" if completion_only_qa else "--no-completion-only-qa",
                "--controls" if controls else "--no-controls", "--archive", str(archive)]
        args += ["--no-archive"] if no_archive else []
        if subprocess.run(args, check=False).returncode != 0:
            click.echo("[study] the report failed (see above); the runs go on")

    take_ctrl_c()
    try:
        if not report_only:
            statuses = run_study(settings, only=list(only) or None, dry_run=dry_run, log=click.echo,
                                 after_each=report_in_child)
            if not dry_run and not any(s["status"] == "interrupted" for s in statuses):
                report_in_child()
        else:
            report()
    except SpdError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
