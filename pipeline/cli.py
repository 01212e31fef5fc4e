"""The command line: one typer command per DVC stage, all built from the `STAGES` table.

Every stage command has one shape: parse its path options, load params.yaml once into typed
settings, refuse outputs that would delete or replace an input or something the stage did not
write (before any work), then call the stage's `run(params, *, <paths>)` inside one commit, so
its outputs appear together or not at all. Heavy libraries are imported inside commands so
`pipeline --help` stays fast. Known input problems exit with a one-line error.
"""
from __future__ import annotations

import errno
import functools
import importlib
import inspect
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import click
import typer
import typer.core


class _OneLineErrors(typer.core.TyperGroup):
    """A bad command line (`validate --height abc`, an unknown option) ends like bad input: one `error:`
    line and exit code 1, not click's boxed usage message and exit code 2. `--help`, and no arguments
    at all, still print the help."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                return super().main(*args, standalone_mode=True, **kwargs)
            context = getattr(exc, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            typer.secho(f"error: {' '.join(exc.format_message().split())}{hint}", fg=typer.colors.RED, err=True)
            sys.exit(1)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


# click's exception base: typer >= 0.2x vendors its own click (its errors derive from typer.TyperException)
_CLICK_ERRORS = tuple(e for e in (getattr(typer, "TyperException", None), click.ClickException) if e is not None)


app = typer.Typer(help="Ultrasound nerve segmentation pipeline: one command per DVC stage.", cls=_OneLineErrors,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read the stage's settings from.")]
F = TypeVar("F", bound=Callable[..., object])


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (preemption, `kill`) unwinds like Ctrl-C, so atomic writes delete their temporaries."""
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    from pipeline.atomic import outputs_published

    done = ("its outputs were already written, complete" if outputs_published() else
            "unfinished outputs were not written (run the stage again to finish)")
    typer.secho(f"error: stopped by {signal.Signals(signum).name}; {done}", fg=typer.colors.RED, err=True)
    raise SystemExit(128 + signum)


def friendly_errors(func: F) -> F:
    """Turn the pipeline's own error types into a clear message and exit code 1, not a traceback;
    SIGTERM exits with code 143 after the same clean-up as an error."""
    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        from pipeline.errors import InputError
        from pipeline.params import ParamsError
        from pipeline.data.rle import RLEError, SubmissionError

        known: tuple[type[Exception], ...] = (InputError, ParamsError, RLEError, SubmissionError)
        try:
            from pipeline.model.checkpoints import CheckpointError
            from pipeline.stages.train import TrainingError
            known += (CheckpointError, TrainingError)
        except ImportError:  # torch missing: only the torch-free commands can run anyway
            pass
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main else None
        try:
            return func(*args, **kwargs)
        except known as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            typer.secho(f"error: no space left on the device{where}; this run's outputs were not written (free "
                        "some space and run the stage again)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return wrapper  # type: ignore[return-value]


Role = Literal["input", "replace", "folder", "persist"]


@dataclass(frozen=True)
class PathOption:
    """One `--name PATH` option of a stage command, passed to `run` as the keyword `name`.

    role: input (read only); replace (an output file or folder replaced as a whole); folder (a
    folder the stage writes files into); persist (a folder written in place and kept between
    runs: train's resumable checkpoints). writes: for a folder, the names the stage writes in it,
    checked before any work like the outputs themselves.
    """
    name: str
    role: Role
    help: str
    writes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    paths: tuple[PathOption, ...]
    outputs_may_nest_in: tuple[str, ...] = ()   # inputs that are folders of pipeline outputs


def _in(name: str, help: str) -> PathOption:
    return PathOption(name, "input", help)


def _out(name: str, help: str, role: Role = "replace", writes: tuple[str, ...] = ()) -> PathOption:
    return PathOption(name, role, help, writes)


_INTERIM = "The load stage's folder (arrays and manifest)."
_RAW = "Dataset folder; its truth/ (synthetic data only) is scored against."
_PLAN = "The plan stage's JSON: the resolved `auto` knobs."
STAGES = (
    Stage("synth", "Generate the embedded synthetic ultrasound dataset (train/, test/, truth/).", (
        _out("out", "Folder to write the Kaggle-layout dataset to."),)),
    Stage("load", "Read and validate the images and masks into compact arrays plus a manifest.", (
        _in("raw", "Dataset folder (layout per data.layout)."),
        _out("out", "Folder for the arrays and manifest."),
        _out("metrics", "Where to write the summary metrics JSON."),
        _out("fingerprint", "Where to write the dataset's fingerprint JSON (sizes, intensities, areas, groups)."))),
    Stage("plan", "Resolve every `auto` knob from the dataset's fingerprint and the device.", (
        _in("fingerprint", "The load stage's fingerprint JSON."),
        _out("out", "Where to write the plan JSON."))),
    Stage("dedup", "Find near-duplicate train frames (block histograms + cosine) and flag contradictory labels.", (
        _in("interim", _INTERIM),
        _in("plan", _PLAN),
        _out("out", "Folder for pairs.csv and groups.csv."),
        _out("reports", "Folder for metrics.json and the audit gallery.png.", "folder",
             ("metrics.json", "gallery.png")))),
    Stage("clean", "Drop train frames whose labels contradict a near-duplicate, per clean.policy.", (
        _in("interim", _INTERIM),
        _in("dedup", "The dedup stage's folder (pairs.csv)."),
        _in("raw", _RAW),
        _out("out", "Folder for the cleaned manifest.csv."),
        _out("metrics", "Where to write the summary metrics JSON."))),
    Stage("augment", "Build the augmentation pipeline from params, save it, and draw a preview of augmented samples.", (
        _in("interim", _INTERIM),
        _in("plan", _PLAN),
        _out("out", "Where to save the albumentations pipeline (JSON)."),
        _out("preview", "Where to write the preview grid PNG."))),
    Stage("train", "Train the U-Net + presence head on subject-grouped folds; resumes from last.pt. "
                   "Works under torchrun.", (
        _in("interim", _INTERIM),
        _in("manifest", "The cleaned manifest: the rows to train on."),
        _in("augment", "The augment stage's saved pipeline."),
        _in("plan", _PLAN),
        _out("models", "Folder for fold_K/best.pt, and last.pt while a fold trains (done.json once it has finished); "
                       "folds.json lists this run's folds.", "persist"),
        _out("oof", "Folder for oof.npz (validation probabilities).", "folder", ("oof.npz",)),
        _out("reports", "Folder for metrics.json, the per-epoch plots/metrics/ (dvclive's) and diagnostics/.",
             "folder", ("metrics.json", "plots/metrics", "diagnostics")))),
    Stage("tune", "Pick pixel / presence / min-area thresholds and component rules by mean Dice on out-of-fold predictions.", (
        _in("oof", "The train stage's folder with oof.npz."),
        _in("interim", _INTERIM),
        _in("plan", _PLAN),
        _out("out", "Where to write the chosen thresholds (JSON)."),
        _out("reports", "Folder for grid.csv, the plots and metrics.json.", "folder",
             ("grid.csv", "dice_vs_pixel.csv", "dice_vs_presence.csv", "dice_vs_min_area.csv", "heatmap.png",
              "oof_scores.csv", "metrics.json")))),
    Stage("predict", "Predict the test images and write a validated run-length-encoded submission.", (
        _in("interim", _INTERIM),
        _in("models", "The train stage's folder: the folds its folds.json lists are averaged."),
        _in("thresholds", "The tune stage's thresholds JSON."),
        _in("raw", _RAW),
        _out("out", "Where to write the submission CSV."),
        _out("metrics", "Where to write the summary metrics JSON."))),
    Stage("export", "Export the folds, flip TTA and tuned thresholds as one bundle: model.onnx, bundle.json, README.md.", (
        _in("models", "The train stage's folder: the folds its folds.json lists go into the graph."),
        _in("thresholds", "The tune stage's thresholds JSON."),
        _out("out", "Folder for the bundle (replaced as a whole)."))),
    Stage("report", "Write one offline HTML page (and a Markdown summary) of this run; experiments: `compare`.", (
        _in("reports", "Folder of the stages' reports (reports/<stage>/..., tune/oof_scores.csv)."),
        _in("interim", _INTERIM),
        _in("oof", "The train stage's folder with oof.npz (checked against tune's per-image scores)."),
        _in("thresholds", "The tune stage's thresholds JSON."),
        _out("html", "Where to write the self-contained HTML report."),
        _out("summary", "Where to write the Markdown summary.")), outputs_may_nest_in=("reports",)),
)


def _echo_summary(summary: dict) -> None:
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")


def run_stage(stage: Stage, params_file: Path, paths: dict[str, Path]) -> dict:
    """Check the paths, then run the stage inside one commit; returns its summary."""
    from pipeline.atomic import Output, check_paths, resolve, stage_commit
    from pipeline.params import load_params

    params = load_params(params_file)
    options = {option.name: option for option in stage.paths}
    inputs = {name: path for name, path in paths.items() if options[name].role == "input"}
    inputs.setdefault("params", params_file)  # read by the stage too: no output may touch it
    outputs = {name: Output(path, options[name].role, options[name].writes)
               for name, path in paths.items() if options[name].role != "input"}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        check_paths(stage.name, inputs=inputs, outputs=outputs, outputs_may_nest_in=stage.outputs_may_nest_in)
    run = importlib.import_module(f"pipeline.stages.{stage.name}").run
    # outputs resolved once (symlinks, `..`): the stage writes exactly where the checks looked
    resolved = {name: resolve(out.path, out.role) for name, out in outputs.items()}
    persistent = [resolved[name] for name, out in outputs.items() if out.role == "persist"]
    with stage_commit(stage.name, immediate=persistent):
        return run(params, **(paths | resolved))


def _stage_command(stage: Stage) -> Callable[..., None]:
    def command(**options: Path) -> None:
        params_file = options.pop("params")
        _echo_summary(run_stage(stage, params_file, options))

    command.__name__, command.__doc__ = stage.name, stage.help
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY,
                           annotation=Annotated[Path, typer.Option(help=option.help)]) for option in stage.paths]
        + [inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, annotation=ParamsOpt,
                             default=Path("params.yaml"))])
    return friendly_errors(command)


@friendly_errors
def validate(submission: Annotated[Path, typer.Argument(help="Submission CSV to check.")],
             test_dir: Annotated[Path | None, typer.Option(help="Folder of test images: every id must appear once.")] = None,
             height: Annotated[int | None, typer.Option(help="Image rows; default: the test images', else 420.")] = None,
             width: Annotated[int | None, typer.Option(help="Image columns; default: the test images', else 580.")] = None,
             params: ParamsOpt = Path("params.yaml")) -> None:
    """Check a submission file: header, ids, and every run-length string (conventions from data.*)."""
    from pipeline.params import load_params
    from pipeline.data.rle import validate_submission_file

    rows = validate_submission_file(submission, test_dir=test_dir, height=height, width=width,
                                    data=load_params(params).data)
    typer.echo(f"{submission}: valid ({rows} rows)")


@friendly_errors
def compare(out: Annotated[Path, typer.Option(help="Where to write the experiments page (HTML).")]
            = Path("reports/experiments.html"),
            params: Annotated[Path, typer.Option(help="The workspace's params.yaml; its git repository is read.")]
            = Path("params.yaml"),
            reports: Annotated[Path, typer.Option(help="The workspace's reports folder (the current run's metrics).")]
            = Path("reports")) -> None:
    """Rank every DVC experiment (git refs/exps) and the current run by Dice: an HTML page, and Markdown on stdout.

    Not a DVC stage: experiments are git refs, which no stage can depend on; run it after new experiments."""
    from pipeline.atomic import Output, check_paths, resolve, stage_commit
    from pipeline.pages.compare import run

    # like a stage: never over an input or a file the compare command did not write
    check_paths("compare", inputs={"params": params, "reports": reports}, outputs={"out": Output(out)},
                outputs_may_nest_in=("reports",))
    with stage_commit("compare"):
        page = run(out=resolve(out), params=params, reports=reports)
    typer.echo(page, nl=False)
    typer.echo(f"wrote {out}", err=True)


@friendly_errors
def segment(bundle: Annotated[Path, typer.Option(help="An exported bundle folder (the export stage's output).")],
            images: Annotated[Path, typer.Option(help="Folder of images to segment (PNG, TIFF, JPEG; any size).")],
            out: Annotated[Path, typer.Option(help="Folder for masks/, overlays/ and submission.csv (replaced as a "
                                                   "whole; never the images folder).")],
            batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
            threads: Annotated[int, typer.Option(help="CPU threads for ONNX Runtime (0: its default).")] = 0) -> None:
    """Segment any folder of images with an exported bundle (ONNX Runtime): masks, overlays, a submission CSV.

    No training stack needed; each mask PNG is at its image's own size.

    Not a DVC stage: the images are any folder. Its outputs are checked like a stage's, before any work."""
    from pipeline.atomic import Output, check_paths, resolve, stage_commit
    from pipeline.deploy.segment import run

    # like a stage: never into the images or the bundle, never over a folder segment did not write
    check_paths("segment", inputs={"bundle": bundle, "images": images}, outputs={"out": Output(out)})
    with stage_commit("segment"):
        summary = run(bundle=bundle, images=images, out=resolve(out), batch_size=batch_size, threads=threads)
    _echo_summary(summary)


for _stage in STAGES:  # in pipeline order, as --help lists them; validate checks predict's output
    if _stage.name == "report":
        app.command()(validate)
    app.command(name=_stage.name)(_stage_command(_stage))
app.command()(compare)  # after report: not a stage, it reads the experiments' git refs
app.command()(segment)  # not a stage: an exported bundle on any folder of images
