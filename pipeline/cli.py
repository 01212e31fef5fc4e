"""The command line: one thin typer command per DVC stage.

Each command parses options, loads params.yaml once into typed settings and calls
the stage's plain `run` function. Heavy libraries are imported inside commands so
`pipeline --help` stays fast. Known input problems exit with a one-line error.
"""
from __future__ import annotations

import functools
import signal
import threading
from pathlib import Path
from typing import Annotated, Callable, TypeVar

import typer

app = typer.Typer(help="Ultrasound nerve segmentation pipeline: one command per DVC stage.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read the stage's settings from.")]
F = TypeVar("F", bound=Callable[..., object])


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (preemption, `kill`) unwinds like Ctrl-C, so atomic writes delete their temporaries."""
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    typer.secho(f"error: stopped by {signal.Signals(signum).name}; unfinished outputs were not written "
                "(run the stage again to finish)", fg=typer.colors.RED, err=True)
    raise SystemExit(128 + signum)


def friendly_errors(func: F) -> F:
    """Turn the pipeline's own error types into a clear message and exit code 1, not a traceback;
    SIGTERM exits with code 143 after the same clean-up as an error."""
    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        from pipeline.io import InputError
        from pipeline.params import ParamsError
        from pipeline.rle import RLEError, SubmissionError

        known: tuple[type[Exception], ...] = (InputError, ParamsError, RLEError, SubmissionError)
        try:
            from pipeline.model import CheckpointError
            from pipeline.train import TrainingError
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
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return wrapper  # type: ignore[return-value]


def _echo_summary(summary: dict) -> None:
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")


@app.command()
@friendly_errors
def synth(out: Annotated[Path, typer.Option(help="Folder to write the Kaggle-layout dataset to.")],
          params: ParamsOpt = Path("params.yaml")) -> None:
    """Generate the embedded synthetic ultrasound dataset (train/, test/, truth/)."""
    from pipeline import synth as stage
    from pipeline.params import load_params

    p = load_params(params)
    _echo_summary(stage.run(p.synth, p.seed, out))


@app.command()
@friendly_errors
def load(raw: Annotated[Path, typer.Option(help="Dataset folder (layout per data.layout).")],
         out: Annotated[Path, typer.Option(help="Folder for the arrays and manifest.")],
         metrics: Annotated[Path, typer.Option(help="Where to write the summary metrics JSON.")],
         params: ParamsOpt = Path("params.yaml")) -> None:
    """Read and validate the images and masks into compact arrays plus a manifest."""
    from pipeline import load as stage
    from pipeline.params import load_params

    _echo_summary(stage.run(raw, load_params(params).data, out, metrics))


@app.command()
@friendly_errors
def dedup(interim: Annotated[Path, typer.Option(help="The load stage's folder (train arrays and manifest).")],
          out: Annotated[Path, typer.Option(help="Folder for pairs.csv and groups.csv.")],
          reports: Annotated[Path, typer.Option(help="Folder for metrics.json and the audit gallery.png.")],
          params: ParamsOpt = Path("params.yaml")) -> None:
    """Find near-duplicate train frames (block histograms + cosine) and flag contradictory labels."""
    from pipeline import dedup as stage
    from pipeline.params import load_params

    _echo_summary(stage.run(load_params(params).dedup, interim, out, reports))


@app.command()
@friendly_errors
def clean(interim: Annotated[Path, typer.Option(help="The load stage's folder (its manifest).")],
          dedup: Annotated[Path, typer.Option(help="The dedup stage's folder (pairs.csv).")],
          raw: Annotated[Path, typer.Option(help="Dataset folder; its truth/ (synthetic data only) is scored against.")],
          out: Annotated[Path, typer.Option(help="Folder for the cleaned manifest.csv.")],
          metrics: Annotated[Path, typer.Option(help="Where to write the summary metrics JSON.")],
          params: ParamsOpt = Path("params.yaml")) -> None:
    """Drop train frames whose labels contradict a near-duplicate, per clean.policy."""
    from pipeline import clean as stage
    from pipeline.params import load_params

    _echo_summary(stage.run(load_params(params).clean, interim, dedup, raw, out, metrics))


@app.command()
@friendly_errors
def augment(interim: Annotated[Path, typer.Option(help="The load stage's folder (train images for the preview).")],
            out: Annotated[Path, typer.Option(help="Where to save the albumentations pipeline (JSON).")],
            preview: Annotated[Path, typer.Option(help="Where to write the preview grid PNG.")],
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Build the augmentation pipeline from params, save it, and draw a preview of augmented samples."""
    from pipeline import augment as stage
    from pipeline.params import load_params

    p = load_params(params)
    _echo_summary(stage.run(p.augment, p.seed, (p.train.height, p.train.width), interim, out, preview))


@app.command()
@friendly_errors
def train(interim: Annotated[Path, typer.Option(help="The load stage's folder (train image and mask arrays).")],
          manifest: Annotated[Path, typer.Option(help="The cleaned manifest: the rows to train on.")],
          augment: Annotated[Path, typer.Option(help="The augment stage's saved pipeline.")],
          models: Annotated[Path, typer.Option(help="Folder for fold_K/best.pt and last.pt (kept for resuming).")],
          oof: Annotated[Path, typer.Option(help="Folder for oof.npz (validation probabilities).")],
          reports: Annotated[Path, typer.Option(help="dvclive folder: metrics.json and per-epoch plots.")],
          params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the U-Net + presence head on subject-grouped folds; resumes from last.pt. Works under torchrun."""
    from pipeline import train as stage
    from pipeline.params import load_params

    p = load_params(params)
    _echo_summary(stage.run(p.train, p.seed, interim, manifest, augment, models, oof, reports, p.diagnostics))


@app.command()
@friendly_errors
def tune(oof: Annotated[Path, typer.Option(help="The train stage's folder with oof.npz.")],
         interim: Annotated[Path, typer.Option(help="The load stage's folder (true train masks, manifest).")],
         out: Annotated[Path, typer.Option(help="Where to write the chosen thresholds (JSON).")],
         reports: Annotated[Path, typer.Option(help="Folder for grid.csv, the plots and metrics.json.")],
         params: ParamsOpt = Path("params.yaml")) -> None:
    """Pick pixel / presence / min-area thresholds by mean Dice on out-of-fold predictions."""
    from pipeline import tune as stage
    from pipeline.params import load_params

    _echo_summary(stage.run(oof, interim, out, reports, load_params(params).tune))


@app.command()
@friendly_errors
def predict(interim: Annotated[Path, typer.Option(help="The load stage's folder (test images, manifest).")],
            models: Annotated[Path, typer.Option(help="Folder of fold_K/best.pt checkpoints; all are averaged.")],
            thresholds: Annotated[Path, typer.Option(help="The tune stage's thresholds JSON.")],
            raw: Annotated[Path, typer.Option(help="Dataset folder; its truth/ (synthetic data only) is scored against.")],
            out: Annotated[Path, typer.Option(help="Where to write the submission CSV.")],
            metrics: Annotated[Path, typer.Option(help="Where to write the summary metrics JSON.")],
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Predict the test images and write a validated run-length-encoded submission."""
    from pipeline import predict as stage
    from pipeline.params import load_params

    p = load_params(params)
    _echo_summary(stage.run(interim, models, thresholds, raw, out, metrics, p.predict, p.data))


@app.command()
@friendly_errors
def validate(submission: Annotated[Path, typer.Argument(help="Submission CSV to check.")],
             test_dir: Annotated[Path | None, typer.Option(help="Folder of test images: every id must appear once.")] = None,
             height: Annotated[int | None, typer.Option(help="Image rows; default: the test images', else 420.")] = None,
             width: Annotated[int | None, typer.Option(help="Image columns; default: the test images', else 580.")] = None,
             params: ParamsOpt = Path("params.yaml")) -> None:
    """Check a submission file: header, ids, and every run-length string (conventions from data.*)."""
    from pipeline.io import InputError, read_image
    from pipeline.layouts import IMAGE_SUFFIXES
    from pipeline.params import load_params
    from pipeline.rle import KAGGLE_SHAPE, validate_submission

    data = load_params(params).data
    ids, shape = None, KAGGLE_SHAPE
    if test_dir is not None:
        if not test_dir.is_dir():
            raise InputError(f"{test_dir}: test folder not found")
        images = sorted(p for p in test_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"{test_dir}: no test images ({', '.join(IMAGE_SUFFIXES)})")
        ids = [p.stem for p in images]
        if height is None or width is None:
            shape = read_image(images[0], data.channels)[0].shape[:2]
    shape = (height or shape[0], width or shape[1])
    rows = validate_submission(submission, ids, shape, columns=data.submission_columns,
                               start=data.rle_start, numeric_ids=data.layout == "ultrasound")
    typer.echo(f"{submission}: valid ({rows} rows)")


@app.command()
@friendly_errors
def report(reports: Annotated[Path, typer.Option(help="Folder of the stages' reports (reports/<stage>/...).")],
           interim: Annotated[Path, typer.Option(help="The load stage's folder (train images, masks, manifest).")],
           oof: Annotated[Path, typer.Option(help="The train stage's folder with oof.npz.")],
           thresholds: Annotated[Path, typer.Option(help="The tune stage's thresholds JSON.")],
           html: Annotated[Path, typer.Option(help="Where to write the self-contained HTML report.")],
           summary: Annotated[Path, typer.Option(help="Where to write the Markdown summary.")],
           params: ParamsOpt = Path("params.yaml")) -> None:
    """Write one offline HTML page (and a Markdown summary) of this run and all DVC experiments."""
    from pipeline import report as stage
    from pipeline.params import load_params

    p = load_params(params)
    _echo_summary(stage.run(p.report, reports, interim, oof, thresholds, params, html, summary))
