"""The ``neuroimagen`` command line: a click group whose commands each call one library function.

Heavy libraries (torch, Ray, diffusers) are imported inside the commands, so ``neuroimagen --help``
stays fast. Every error a user can cause prints one line ``neuroimagen: error: ...`` and exits 2.
A command that writes a run directory holds its lock (``neuroimagen.rundir.hold``) from start to end.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from neuroimagen import __version__
from neuroimagen.errors import NeuroimagenError, one_line

SET_HELP = "Override one config key, e.g. --set data.split_num=1 (repeatable; the value is YAML)."


def config_options(f):
    """--config FILE and repeatable --set KEY=VALUE, taken by every command."""
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="YAML config file (defaults fill anything it leaves out).")(f)
    return f


@contextlib.contextmanager
def _hold(path, kind="run", create=True):
    """Hold the run directory ``path`` for this whole command (``neuroimagen.rundir.hold``): a second
    command on it exits 2 naming this one's pid. While held, every message of the command (debug included)
    is also written to ``<run>/logs/<command>-<UTC time>.log``."""
    from neuroimagen.logs import log_file
    from neuroimagen.rundir import LOCK, hold

    command = click.get_current_context().command_path
    with hold(path, command, kind=kind, create=create) as held:
        if not (held / LOCK).is_file():  # nothing to hold (a missing run: the command says what it lacks)
            yield held
            return
        with log_file(held, "-".join(command.split()[1:]) or "neuroimagen"):
            yield held


def _load(config_path, overrides):
    from neuroimagen.config import load_config

    return load_config(config_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="neuroimagen")
@click.option("-v", "--verbose", is_flag=True, help="Also show debug messages (with their source).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (results are still printed).")
def cli(verbose, quiet):
    """Reconstruct seen images from EEG (NeuroImagen): data, training, sweeps, reconstruction, scoring.

    Start with `neuroimagen demo` (synthetic twin, tiny models, CPU), or inspect a real dataset with
    `neuroimagen data inspect PATH`. Messages go to stderr (and, for a command that writes a run, to
    RUN/logs/); results go to stdout.
    """
    from neuroimagen.logs import configure_cli

    configure_cli(-1 if quiet else (1 if verbose else 0))


# ---------------------------------------------------------------------------------------------
# config


@cli.group()
def config():
    """Show and check configuration."""


@config.command("show")
@config_options
def config_show(config_path, overrides):
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from neuroimagen.config import dump_config

    click.echo(dump_config(_load(config_path, overrides)), nl=False)


@config.command("keys")
def config_keys():
    """List every config key with its type, default and meaning."""
    from neuroimagen.config import describe_fields

    for key, tp, default, doc in describe_fields():
        click.echo(f"{key:36s} {tp:40s} default={default!r}")
        if doc:
            click.echo(f"{'':36s} {doc}")


# ---------------------------------------------------------------------------------------------
# data


@cli.group()
def data():
    """Synthesise, inspect and check datasets."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["eeg-imagenet", "things-eeg"]), default=None)
@click.option("--classes", type=int, default=None, help="Number of classes (2-40).")
@click.option("--images-per-class", type=int, default=None, help="Images per class (>= 10).")
@click.option("--subjects", type=int, default=None, help="Number of subjects.")
@click.option("--channels", type=int, default=None, help="EEG channels (real: 128; THINGS 17 or 63).")
@click.option("--times", type=int, default=None, help="things-eeg: samples per segment (100 or 250).")
@click.option("--layout", type=click.Choice(["17x100", "63x250"]), default=None,
              help="things-eeg: a released channels x samples layout with its channel names (instead of --channels/--times).")
@click.option("--test-classes", type=int, default=None,
              help="things-eeg: test concepts, disjoint from the training ones (one image each).")
@click.option("--image-size", type=int, default=None, help="Image side in pixels.")
@click.option("--snr", type=float, default=None, help="Signal-to-noise ratio of the evoked sources.")
@click.option("--seed", type=int, default=None, help="Seed; the same seed writes the same files.")
@click.option("--eeg-code", type=click.Choice(["sources", "bandpower", "erp"]), default=None,
              help="How the EEG carries class and instance (see `neuroimagen config keys`, synth.eeg_code).")
@click.option("--images", "images", type=click.Choice(["objects", "glyphs", "cluttered"]), default=None,
              help="Stimulus image family.")
@click.option("--member", default=None, help="A named member of the twin family (its settings, then any flags): "
              "sources-objects, bandpower-objects, erp-glyphs, bandpower-cluttered.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a twin neuroimagen wrote.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@config_options
def data_synth(out, fmt, classes, images_per_class, subjects, channels, times, layout, test_classes, image_size, snr,
               seed, eeg_code, images, member, overwrite, quiet, config_path, overrides):
    """Write a synthetic twin dataset to OUT in the real EEG-ImageNet or THINGS-EEG2 layout."""
    from neuroimagen.data.synthetic import TWIN_FAMILY

    if member is not None and member not in TWIN_FAMILY:
        raise click.BadParameter(f"unknown member '{member}' (known: {', '.join(TWIN_FAMILY)})", param_hint="--member")
    preset = tuple(f"synth.{k}={json.dumps(v)}" for k, v in TWIN_FAMILY.get(member, {}).items())
    flags = {"format": fmt, "classes": classes, "images_per_class": images_per_class, "subjects": subjects,
             "channels": channels, "times": times, "layout": layout, "test_classes": test_classes, "image_size": image_size, "snr": snr, "seed": seed,
             "eeg_code": eeg_code, "images": images}
    extra = tuple(f"synth.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)
    cfg = _load(config_path, preset + tuple(overrides) + extra)
    from neuroimagen.data.synthetic import synthesize
    from neuroimagen.rundir import check_target

    check_target(out, "twin", overwrite, flag="OUT")

    summary = synthesize(out, cfg.synth, overwrite=overwrite, show_progress=not quiet)
    things = cfg.synth.format == "things-eeg"
    classes_text = (f"{cfg.synth.classes} training + {cfg.synth.test_classes} test concepts" if things
                    else f"{cfg.synth.classes} classes")
    channels_text = (f"{summary['channels']} x {summary['times']}" if things else f"{summary['channels']} channels")
    click.echo(f"wrote {summary['segments']} segments, {summary['images']} images ({cfg.synth.format}, "
               f"{classes_text}, {cfg.synth.subjects} subjects, {channels_text}, "
               f"EEG code {cfg.synth.eeg_code}, {cfg.synth.images}) to {out}")
    click.echo(f"read it with: --config {out}/config.yaml")


@data.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--splits", type=click.Path(dir_okay=False), default=None, help="EEG-ImageNet split file (default: next to PATH).")
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Image root.")
@click.option("--format", "fmt", type=click.Choice(["eeg-imagenet", "things-eeg"]), default=None,
              help="Data layout (detected from PATH when omitted).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Also write inspect.json and config.yaml here.")
@config_options
def data_inspect(path, splits, images, fmt, as_json, out, config_path, overrides):
    """Count segments, subjects, classes, lengths, splits, missing images and leakage in PATH.

    Exit code 0: no problems; 1: problems listed; 2: the files could not be read.
    """
    import os

    cfg = _load(config_path, overrides)
    from neuroimagen.data.inspection import inspect_dataset, render_report

    abspath = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731
    report = inspect_dataset(os.path.abspath(path), fmt, abspath(splits), abspath(images), cfg.data)
    click.echo(json.dumps(report, indent=2) if as_json else render_report(report))
    if out is not None:
        from neuroimagen.atomic import write_text
        from neuroimagen.config import write_config

        write_text(os.path.join(out, "inspect.json"), json.dumps(report, indent=2))
        write_config(cfg, out)
    if report["problems"]:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# train


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory (created; re-running resumes).")
@click.option("--stages", default=None, metavar="LIST",
              help="Comma-separated subset of encoder,saliency,semantic,semantic_image,clip_image (default: all, in dependency "
              "order; clip_image when stages.clip_image.enabled).")
@config_options
def train(out, stages, config_path, overrides):
    """Train stages 1-3 (encoder, saliency GAN, semantic regressors; clip_image when stages.clip_image.enabled), on
    Ray Train or in-process."""
    cfg = _load(config_path, overrides)
    with _hold(out):  # before torch loads: a run in use is refused at once
        from neuroimagen import backends

        backends.train(cfg, out, stages.split(",") if stages else None)


# ---------------------------------------------------------------------------------------------
# tune


@cli.command()
@click.option("--space", "space_path", type=click.Path(dir_okay=False), default=None,
              help="Search space YAML (e.g. tune_spaces/gan.yaml).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Sweep directory (default: runs/tune-<stage>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Resume the interrupted sweep in this directory (its space and config are reused).")
@config_options
def tune(space_path, out, resume_dir, config_path, overrides):
    """Sweep one stage's hyperparameters with Ray Tune (ASHA), on validation data; writes best.yaml."""
    import os

    from neuroimagen.errors import ConfigError
    from neuroimagen.runs.sweeps import load_space

    if resume_dir is not None:
        saved = os.path.join(resume_dir, "space.json")
        if not os.path.isfile(saved):
            raise ConfigError(f"--resume {resume_dir}: no sweep there (expected {saved})")
        space_path = space_path or json.load(open(saved, encoding="utf-8"))["space"]
        out = resume_dir
    if space_path is None:
        raise ConfigError("--space: required (e.g. --space tune_spaces/gan.yaml), or --resume DIR")
    space, cfg = load_space(space_path, config_path, overrides)
    from neuroimagen import backends
    from neuroimagen.distributed.tune import run_sweep

    out = out or os.path.join("runs", f"tune-{space.stage}")
    with _hold(out, kind="sweep"):
        res = run_sweep(space, cfg, out, resume=resume_dir is not None, fit=backends.fit_stage)
    table = res["results"]
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    b = res["best"]
    click.echo(f"best trial {b['best_trial']}: {b['metric']}={b['best_value']:.4g} (validation) with {b['best_params']}; "
               f"{b['stopped_early']}/{b['trials']} trials stopped early")
    click.echo(f"best config: {res['best_config']}  (neuroimagen train --config {res['best_config']} --out RUN)")


# ---------------------------------------------------------------------------------------------
# reconstruct / evaluate / report


def _run_config(run, config_path, overrides):
    """A run's own resolved config (``RUN/config.yaml``) unless --config names another, plus --set."""
    import os

    from neuroimagen.errors import ConfigError

    path = config_path or os.path.join(run, "config.yaml")
    if config_path is None and not os.path.isfile(path):
        raise ConfigError(f"{run}: not a run directory (no config.yaml); train one with `neuroimagen train --out {run}`")
    return _load(path, overrides)


def _csv_list(text, what, cast=str):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        from neuroimagen.errors import ConfigError

        raise ConfigError(f"--{what}: expected a comma-separated list of integers, got {text!r}") from None


@cli.command()
@click.option("--run", "run", type=click.Path(file_okay=False), required=True, help="A trained run directory.")
@click.option("--variants", default=None, metavar="LIST", help="Comma-separated variants (default: eval.variants), "
              "e.g. I,L,B,B+I,L+I,oracle,other-class.")
@click.option("--subjects", default=None, metavar="LIST", help="Comma-separated subject ids (default: all).")
@config_options
def reconstruct(run, variants, subjects, config_path, overrides):
    """Generate images for subjects x variants x test trials x samples, and score them (resumable)."""
    cfg = _run_config(run, config_path, overrides)
    from neuroimagen import backends

    with _hold(run, create=False):
        backends.reconstruct(cfg, run, _csv_list(variants, "variants"), _csv_list(subjects, "subjects", int))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory (created; re-running resumes).")
@click.option("--variants", default=None, metavar="LIST", help="Comma-separated variants (default: eval.variants).")
@click.option("--subjects", default=None, metavar="LIST", help="Comma-separated subject ids (default: all).")
@config_options
def ablation(out, variants, subjects, config_path, overrides):
    """Train what the variants need, reconstruct and score all subjects x variants, write the report.

    With --set eval.protocol=loso, then one leave-one-subject-out fold per subject in OUT/loso/sub-XX/ (resumable)
    and OUT/results/summary_loso.csv: both protocols per subject, side by side in the report."""
    cfg = _load(config_path, overrides)
    from neuroimagen import backends
    from neuroimagen.runs.reports import loso_table, summary_table

    with _hold(out):
        backends.ablation(cfg, out, _csv_list(variants, "variants"), _csv_list(subjects, "subjects", int))
    click.echo(summary_table(out))
    if cfg.eval.protocol == "loso" and cfg.data.holdout_subject is None:
        click.echo("\nWithin subject vs leave-one-subject-out:\n" + loso_table(out))


@cli.command()
@click.option("--run", "run", type=click.Path(file_okay=False), required=True,
              help="A run with a trained stage 3 and/or stage clip_image.")
@click.option("--subjects", default=None, metavar="LIST", help="Comma-separated subject ids (default: all).")
@config_options
def retrieval(run, subjects, config_path, overrides):
    """k-way retrieval of the evaluated concepts from stage 3's caption embedding and of the evaluated images from the
    clip_image embedding, when trained (zero-shot on THINGS-EEG2)."""
    cfg = _run_config(run, config_path, overrides)
    from neuroimagen.runs.retrieval import semantic_retrieval

    with _hold(run, create=False):
        table = semantic_retrieval(cfg, run, _csv_list(subjects, "subjects", int))
    pooled = table[(table["subject"] == "all")]
    for (emb, k, top), g in pooled.groupby(["embedding", "k", "top"], sort=True):
        acc = {c: float(v["accuracy"].iloc[0]) for c, v in g.groupby("control")}
        click.echo(f"{emb:>10} {int(k):>3}-way top-{int(top)}: EEG {100 * acc.get('eeg', float('nan')):5.1f} %  shuffled "
                   f"{100 * acc.get('shuffled', float('nan')):5.1f} %  chance {100 * float(g['chance'].iloc[0]):5.1f} %")


@cli.command()
@click.option("--run", "run", type=click.Path(file_okay=False), required=True, help="A reconstructed run directory.")
def evaluate(run):
    """Reduce the scored shards into results/per_sample.parquet, summary.csv and protocol.json (and, when RUN has
    finished leave-one-subject-out folds, summary_loso.csv from them and the new summary)."""
    from neuroimagen.runs.evaluation import evaluate as run_evaluate
    from neuroimagen.runs.loso import finished_folds, write_loso_results
    from neuroimagen.runs.reports import loso_table, summary_table

    with _hold(run, create=False):
        run_evaluate(run)
        folds = finished_folds(run)
        if folds:
            write_loso_results(run, folds)
    click.echo(summary_table(run))
    if folds:
        click.echo("\nWithin subject vs leave-one-subject-out:\n" + loso_table(run))


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--reference", "reference", type=click.Path(dir_okay=False), default=None,
              help="Also save the run's pooled numbers, results block and provenance as a reference JSON.")
@click.option("--readme", "readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Rewrite this file's results block (between <!-- results:begin/end --> markers) from the run.")
@click.option("--command", "command", default="neuroimagen demo --quick", show_default=True,
              help="The command that produced the run, named in the results block.")
def report(run, reference, readme, command):
    """Write RUN/report/report.md: ablation and per-subject tables, figures, image grids, protocols."""
    from neuroimagen.runs.reference import make_reference, save_reference, update_readme
    from neuroimagen.runs.reports import write_report

    with _hold(run, create=False):
        path = write_report(run)
        ref = make_reference(run, command) if (reference or readme) else None
    click.echo(str(path))
    if reference:
        click.echo(str(save_reference(ref, reference)))
    if readme:
        changed = update_readme(readme, ref["block"])
        click.echo(f"{readme}: results block {'rewritten' if changed else 'already up to date'}")


@cli.command()
@click.argument("run_a", type=click.Path(file_okay=False, exists=True))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True))
@click.option("--per-subject", is_flag=True, help="Every subject's rows, not only the pooled ones.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table to this file.")
def compare(run_a, run_b, per_subject, out):
    """Two evaluated runs side by side; numbers whose protocols differ are marked and the differences named."""
    from neuroimagen.atomic import write_text
    from neuroimagen.runs.compare import compare_runs, format_comparison

    text = format_comparison(compare_runs(run_a, run_b, subjects=None if per_subject else ("all",)), run_a, run_b)
    if out:
        write_text(Path(out), text)
    click.echo(text, nl=False)


# ---------------------------------------------------------------------------------------------
# demo


@cli.command()
@click.option("--quick", is_flag=True, help="Smaller twin, shorter runs, in-process backends (under 3 minutes).")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a run neuroimagen wrote.")
@click.option("--member", default=None, help="Run on a member of the twin family instead of the default twin: "
              "sources-objects, bandpower-objects, erp-glyphs, bandpower-cluttered.")
@click.option("--dataset", type=click.Choice(["eeg-imagenet", "things-eeg"]), default="eeg-imagenet", show_default=True,
              help="The twin's layout. things-eeg: THINGS-EEG2 with zero-shot test concepts; adds retrieval within "
              "subject and leave-one-subject-out.")
@config_options
def demo(quick, out, overwrite, member, dataset, config_path, overrides):
    """Run the whole pipeline on the embedded default: synthetic twin, CPU, tiny models."""
    cfg = _load(config_path, overrides)
    from neuroimagen import backends
    from neuroimagen.rundir import check_target
    from neuroimagen.runs.demo import demo_overrides, run_demo

    demo_overrides(quick, cfg.seed, member, dataset=dataset)  # an unknown member fails before anything is written
    check_target(out, "run", overwrite)  # before the lock file: a folder that is not ours is left untouched
    with _hold(out):
        res = run_demo(cfg, out, quick=quick, overwrite=overwrite, user_overrides=overrides, fit=backends.fit_stage,
                       execute=backends.run_rows, member=member, dataset=dataset)
    for line in res["lines"]:
        click.echo(line)


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv=None) -> None:
    """Console-script entry: one-line errors, exit code 2 for anything the user can fix."""
    try:
        rv = cli.main(args=argv, prog_name="neuroimagen", standalone_mode=False)
    except NeuroimagenError as exc:
        click.echo(f"neuroimagen: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if exc.__class__.__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `neuroimagen data`
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        msg = one_line(exc.format_message())
        hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"neuroimagen: error: {msg}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"neuroimagen: error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the OS refused a path no library check caught (not a directory, disk full, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"neuroimagen: error: {one_line(f'{where}{exc.strerror or exc}')}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("neuroimagen: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("neuroimagen: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
