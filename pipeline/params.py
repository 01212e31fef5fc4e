"""params.yaml -> typed, validated settings.

Every stage loads the whole file through `load_params`, so a typo anywhere fails
fast, naming the key, before any work is done.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ParamsError(ValueError):
    """A params.yaml problem, with the dotted key that caused it."""


def _range(ge: float | None = None, le: float | None = None, gt: float | None = None,
           lt: float | None = None, **kw: Any) -> Any:
    """A dataclass field with bounds checked by `_coerce`."""
    return field(metadata={"ge": ge, "le": le, "gt": gt, "lt": lt}, **kw)


@dataclass(frozen=True)
class DataParams:
    """Where the dataset is and how it is laid out; see the README's "Dataset layouts"."""
    raw_dir: str = "data/raw/synthetic"
    layout: Literal["ultrasound", "folders", "csv"] = "ultrasound"
    channels: Literal["gray", "rgb"] = "gray"
    csv_file: str = "train.csv"
    id_column: str = "id"
    rle_column: str = "rle_mask"
    group_column: Optional[str] = None
    rle_order: Literal["column", "row"] = "column"
    rle_start: Literal[0, 1] = 1
    submission_columns: tuple[str, ...] = ("img", "pixels")


@dataclass(frozen=True)
class SynthParams:
    subjects: int = _range(ge=2, default=12)
    frames_per_subject: int = _range(ge=2, default=40)
    test_images: int = _range(ge=1, default=80)
    height: int = _range(ge=32, default=420)
    width: int = _range(ge=32, default=580)
    empty_fraction: float = _range(ge=0.0, le=1.0, default=0.58)
    label_noise: float = _range(ge=0.0, le=1.0, default=0.12)
    layout: Literal["ultrasound", "folders", "csv"] = "ultrasound"


@dataclass(frozen=True)
class DedupParams:
    block_size: int = _range(ge=1, default=20)
    bins: int = _range(ge=2, le=256, default=9)
    threshold: float = _range(ge=0.0, le=2.0, default=0.008)
    scope: Literal["subject", "global"] = "subject"
    chunk_size: int = _range(ge=1, default=2048)
    gallery_pairs: int = _range(ge=0, default=12)
    min_pair_dice: float = _range(ge=0.0, le=1.0, default=0.2)


@dataclass(frozen=True)
class CleanParams:
    policy: Literal["none", "drop_empty", "drop_both"] = "drop_empty"


@dataclass(frozen=True)
class AugmentParams:
    hflip_p: float = _range(ge=0.0, le=1.0, default=0.5)
    vflip_p: float = _range(ge=0.0, le=1.0, default=0.0)
    affine_p: float = _range(ge=0.0, le=1.0, default=0.5)
    shift: float = _range(ge=0.0, le=0.5, default=0.0625)
    scale: float = _range(ge=0.0, le=0.5, default=0.1)
    rotate: float = _range(ge=0.0, le=180.0, default=10.0)
    brightness_contrast_p: float = _range(ge=0.0, le=1.0, default=0.5)
    brightness: float = _range(ge=0.0, le=1.0, default=0.1)
    contrast: float = _range(ge=0.0, le=1.0, default=0.2)
    gamma_p: float = _range(ge=0.0, le=1.0, default=0.3)
    gamma_low: float = _range(gt=0.0, default=80.0)
    gamma_high: float = _range(gt=0.0, default=120.0)
    elastic_p: float = _range(ge=0.0, le=1.0, default=0.0)
    elastic_alpha: float = _range(ge=0.0, default=20.0)
    elastic_sigma: float = _range(gt=0.0, default=5.0)
    preview_samples: int = _range(ge=1, default=8)


@dataclass(frozen=True)
class TrainParams:
    encoder: str = "resnet18"
    encoder_depth: int = _range(ge=3, le=5, default=5)
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    encoder_weights: Literal["none", "imagenet"] = "none"
    presence_head: bool = True
    height: int = _range(ge=32, default=96)
    width: int = _range(ge=32, default=128)
    epochs: int = _range(ge=1, default=12)
    batch_size: int = _range(ge=1, default=16)
    lr: float = _range(gt=0.0, default=1e-3)
    weight_decay: float = _range(ge=0.0, default=1e-4)
    folds: int = _range(ge=2, default=4)
    train_folds: int = _range(ge=1, default=1)
    bce_weight: float = _range(ge=0.0, default=1.0)
    dice_weight: float = _range(ge=0.0, default=1.0)
    presence_weight: float = _range(ge=0.0, default=0.5)
    workers: int = _range(ge=0, default=0)
    threads: int = _range(ge=0, default=0)
    amp: bool = True


@dataclass(frozen=True)
class DiagnosticsParams:
    """Training health and what the model learned (README "Diagnostics").

    Its own section, not train's: none of it changes the weights, so it is not in the resume hash.
    """
    enabled: bool = True
    subset: int = _range(ge=1, default=32)
    patience: int = _range(ge=1, default=4)
    grad_vanish: float = _range(ge=0.0, default=1e-6)
    grad_explode: float = _range(gt=0.0, default=1e3)


@dataclass(frozen=True)
class TuneParams:
    """The joint search grid; each list must be non-empty (an empty axis would search nothing).

    Presence 0 and min area 0 switch those gates off, so the search can choose not to gate.
    """
    pixel_thresholds: tuple[float, ...] = _range(ge=0.0, le=1.0, default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    presence_thresholds: tuple[float, ...] = _range(ge=0.0, le=1.0,
                                                    default=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    min_areas: tuple[int, ...] = _range(ge=0, default=(0, 250, 500, 1000, 1500, 2000, 3000))


@dataclass(frozen=True)
class PredictParams:
    tta_flip: bool = True
    batch_size: int = _range(ge=1, default=32)


@dataclass(frozen=True)
class ReportParams:
    gallery_images: int = _range(ge=1, default=6)


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = DataParams()
    synth: SynthParams = SynthParams()
    dedup: DedupParams = DedupParams()
    clean: CleanParams = CleanParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    diagnostics: DiagnosticsParams = DiagnosticsParams()
    tune: TuneParams = TuneParams()
    predict: PredictParams = PredictParams()
    report: ReportParams = ReportParams()


def _coerce(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin is Union and type(None) in typing.get_args(hint):
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return None if value is None else _coerce(key, value, inner, meta)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or not value:
            raise ParamsError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item, meta) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<="),
                            ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ParamsError(f"{key}: {value!r} is out of range (must be {word} {b})")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ParamsError(f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
                          f"{', '.join(f'{prefix}.{k}'.lstrip('.') for k in unknown)} "
                          f"(known: {', '.join(fields)})")
    values = {name: _coerce(f"{prefix}.{name}".lstrip("."), raw[name], hints[name], fields[name].metadata)
              for name in fields if name in raw}
    return cls(**values)


def _check_cross_fields(p: Params) -> None:
    if len(p.data.submission_columns) != 2:
        raise ParamsError("data.submission_columns: needs exactly two names (id column, RLE column)")
    if p.train.train_folds > p.train.folds:
        raise ParamsError(f"train.train_folds: {p.train.train_folds} is more than train.folds ({p.train.folds})")
    if len(p.train.decoder_channels) != p.train.encoder_depth:
        raise ParamsError(f"train.decoder_channels: needs {p.train.encoder_depth} entries "
                          f"(one per train.encoder_depth level), got {len(p.train.decoder_channels)}")
    if p.augment.gamma_low > p.augment.gamma_high:
        raise ParamsError("augment.gamma_low: must not exceed augment.gamma_high")


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping; raises ParamsError naming the bad key."""
    params = _build(Params, raw, "")
    _check_cross_fields(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse_params(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def to_dict(params: Any) -> dict[str, Any]:
    """Plain-dict view (tuples as lists), for writing back to YAML or JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(params))

