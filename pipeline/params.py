"""params.yaml -> typed, validated settings.

Every stage loads the whole file through `load_params`, so a typo anywhere fails
fast, naming the key, before any work is done.

The sections are pydantic (v2) dataclasses: frozen, unknown keys refused, strict
types (no 1.0 or true for an integer, no 1 for a boolean; an integer is accepted
for a float), bounds on every number. Being real dataclasses, `dataclasses.replace`
(which re-validates), `dataclasses.asdict` and `dataclasses.fields` keep working.

The field defaults here are the single source of defaults: params.yaml must equal
them (tests/test_params.py checks it key for key), so a missing key, section or an
empty file means the params.yaml value. params.py stays free of torch and smp:
whether `train.encoder` names a real encoder is checked when the model is built.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import stat
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import annotated_types
import yaml
from pydantic import (BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator, model_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

__all__ = ["ParamsError", "Params", "DataParams", "SynthParams", "DedupParams", "CleanParams", "AugmentParams",
           "TrainParams", "DiagnosticsParams", "TuneParams", "PredictParams", "ReportParams",
           "UniqueKeyLoader", "parse_params", "parse_yaml", "load_params", "to_dict"]


class ParamsError(ValueError):
    """A params.yaml problem, with the dotted key that caused it."""


# Strict scalar types: an int is accepted (and converted) for a float, nothing else is coerced.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
Int = StrictInt
Float = Annotated[float, Field(strict=True)]
Bool = StrictBool
Str = Annotated[StrictStr, Field(min_length=1)]
Layout = Literal["ultrasound", "folders", "csv"]
Auto = Literal["auto"]   # resolved from the dataset fingerprint and the device by the plan stage
SEED_MAX = 2**32 - 1   # np.random.seed / RandomState take 0..2**32-1


def _exact_int(value: Any) -> Any:
    """Literal[0, 1] alone accepts 1.0 and True (they compare equal); refuse anything but an int."""
    if type(value) is not int:
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": "0 or 1"})
    return value


def _cross(key: str, message: str) -> PydanticCustomError:
    """A cross-field error attributed to `key` of the section being validated."""
    return PydanticCustomError("cross_field", "{message}", {"key": key, "message": message})


@dataclass(frozen=True, config=_CONFIG)
class DataParams:
    """Where the dataset is and how it is laid out; see the README's "Dataset layouts"."""
    raw_dir: Str = Field("data/raw/synthetic", description="Dataset folder (Kaggle layout or per `layout`).")
    layout: Layout = Field("ultrasound", description="ultrasound: S_I.tif + S_I_mask.tif; folders: images/ + "
                                                     "masks/; csv: images/ + an RLE mask table.")
    channels: Literal["gray", "rgb"] = Field("gray", description="gray (colour converted) or rgb "
                                                                 "(grayscale repeated to 3 channels).")
    csv_file: Str = Field("train.csv", description="The csv layout's mask table; also the group table.")
    id_column: Str = Field("id", description="Image id column of csv_file.")
    rle_column: Str = Field("rle_mask", description="RLE mask column of csv_file.")
    group_column: Optional[Str] = Field(None, description="Column of validation groups; null: one group per image.")
    rle_order: Literal["column", "row"] = Field("column", description="RLE pixel order of labels and submission.")
    rle_start: Annotated[Literal[0, 1], BeforeValidator(_exact_int)] = Field(
        1, description="Index of the first pixel in RLE (1: Kaggle ultrasound, or 0).")
    submission_columns: tuple[Str, ...] = Field(("img", "pixels"), description="Submission header: id column, "
                                                                               "RLE column (two distinct names).")
    foreground: Optional[Annotated[tuple[Annotated[Int, Field(ge=0, le=65535)], ...], Field(min_length=1)]] = Field(
        None, description="Mask label values that count as foreground (palette indices or gray/16-bit values); "
                          "null: binary masks (0/255, 0/1, 0/65535).")
    object_name: Str = Field("nerve", description="What the masks outline, for the report's words.")

    @field_validator("submission_columns")
    @classmethod
    def _two_distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) != 2 or v[0] == v[1]:
            raise PydanticCustomError("two_names", "needs exactly two different names (id column, RLE column)")
        return v


@dataclass(frozen=True, config=_CONFIG)
class SynthParams:
    """The embedded synthetic dataset generator."""
    subjects: Int = Field(12, ge=2, description="Subjects (validation groups) to generate.")
    frames_per_subject: Int = Field(40, ge=2, description="Training frames per subject.")
    test_images: Int = Field(80, ge=1, description="Unlabelled test images.")
    height: Int = Field(420, ge=32, description="Image height, pixels.")
    width: Int = Field(580, ge=32, description="Image width, pixels.")
    empty_fraction: Float = Field(0.58, ge=0.0, le=1.0, description="Fraction of train frames with an empty mask.")
    label_noise: Float = Field(0.12, ge=0.0, le=1.0, description="Fraction of visible-nerve masks erased.")
    layout: Layout = Field("ultrasound", description="Layout the generator writes; set data.layout to match.")


@dataclass(frozen=True, config=_CONFIG)
class DedupParams:
    """Near-duplicate frames: block histograms compared by cosine distance."""
    grid: Auto | tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] = Field(
        "auto", description="Blocks per image as [rows, cols] (edges from linspace, so any size fits); "
                            "auto: blocks of about 20 px at the median image size.")
    bins: Int = Field(9, ge=2, le=256, description="Histogram bins per block over 0..255.")
    threshold: Float = Field(0.008, ge=0.0, le=2.0, description="Cosine distance below which frames are duplicates.")
    scope: Literal["auto", "subject", "global"] = Field(
        "auto", description="Compare within a subject or all pairs; auto: subject when the data has groups.")
    chunk_size: Int = Field(2048, ge=1, description="Images per similarity tile (memory ~ chunk_size^2).")
    gallery_pairs: Int = Field(12, ge=0, description="Contradictory pairs drawn in the gallery (0: none).")
    min_pair_dice: Float = Field(0.2, ge=0.0, le=1.0, description="Two masks overlapping less than this contradict.")


@dataclass(frozen=True, config=_CONFIG)
class CleanParams:
    """What to drop from the training set given dedup's contradictory pairs."""
    policy: Literal["none", "drop_empty", "drop_both"] = Field(
        "drop_empty", description="none; drop_empty: the empty frame of each empty-vs-masked pair; drop_both.")


@dataclass(frozen=True, config=_CONFIG)
class AugmentParams:
    """Training-time augmentation (albumentations) at the working size."""
    hflip_p: Float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability.")
    vflip_p: Float = Field(0.0, ge=0.0, le=1.0, description="Vertical flip probability.")
    affine_p: Float = Field(0.5, ge=0.0, le=1.0, description="Probability of the shift/scale/rotate affine.")
    shift: Float = Field(0.0625, ge=0.0, le=0.5, description="Max shift, fraction of width and height.")
    scale: Float = Field(0.1, ge=0.0, le=0.5, description="Zoom in 1 +- scale.")
    rotate: Float = Field(10.0, ge=0.0, le=180.0, description="Max rotation, degrees.")
    brightness_contrast_p: Float = Field(0.5, ge=0.0, le=1.0, description="Brightness/contrast probability.")
    brightness: Float = Field(0.1, ge=0.0, le=1.0, description="Max brightness shift, fraction of the range.")
    contrast: Float = Field(0.2, ge=0.0, le=1.0, description="Max contrast change, fraction.")
    gamma_p: Float = Field(0.3, ge=0.0, le=1.0, description="Gamma probability.")
    gamma_low: Float = Field(80.0, gt=0.0, description="Gamma range low end, percent (100 = unchanged).")
    gamma_high: Float = Field(120.0, gt=0.0, description="Gamma range high end, percent.")
    elastic_p: Float = Field(0.0, ge=0.0, le=1.0, description="Elastic deformation probability.")
    elastic_alpha: Float = Field(20.0, ge=0.0, description="Elastic displacement strength, working-size pixels.")
    elastic_sigma: Float = Field(5.0, gt=0.0, description="Elastic smoothness, working-size pixels.")
    noise_p: Float = Field(0.0, ge=0.0, le=1.0, description="Gaussian noise probability.")
    noise_std: Float = Field(0.05, ge=0.0, le=1.0, description="Max noise standard deviation, fraction of the range.")
    blur_p: Float = Field(0.0, ge=0.0, le=1.0, description="Gaussian blur probability.")
    blur_sigma: Float = Field(1.0, ge=0.5, description="Max blur sigma, working-size pixels (min 0.5).")
    lowres_p: Float = Field(0.0, ge=0.0, le=1.0, description="Low-resolution simulation probability.")
    lowres_scale: Float = Field(0.5, gt=0.0, le=1.0, description="Smallest down-scaling factor of the simulation.")
    preview_samples: Int = Field(8, ge=1, description="Rows of the augmentation preview.")

    @model_validator(mode="after")
    def _gamma_order(self) -> AugmentParams:
        if self.gamma_low > self.gamma_high:
            raise _cross("gamma_low", f"{self.gamma_low!r} must not exceed augment.gamma_high ({self.gamma_high!r})")
        return self


@dataclass(frozen=True, config=_CONFIG)
class TrainParams:
    """U-Net (segmentation_models_pytorch) with a presence head, trained on subject-grouped folds."""
    encoder: Str = Field("resnet18", description="smp encoder name (checked when the model is built).")
    encoder_depth: Int = Field(5, ge=3, le=5, description="Downsampling stages.")
    decoder_channels: tuple[Annotated[Int, Field(ge=1)], ...] = Field(
        (128, 64, 32, 16, 8), min_length=1, description="Decoder channels, one per encoder_depth level.")
    encoder_weights: Str = Field(
        "none", description="Pretrained encoder weights: none, imagenet (downloads), or a local file holding "
                            "the smp encoder's state_dict (offline, e.g. a Kaggle dataset).")
    presence_head: Bool = Field(True, description="Classification head: is there a nerve at all?")
    presence_pooling: Literal["avg", "max"] = Field(
        "avg", description="How the presence head pools the deepest feature map: avg (smp's default) or max "
                           "(an object in one cell is enough, however small).")
    norm: Literal["batch", "instance"] = Field(
        "batch", description="Normalisation layers: batch (smp's BatchNorm) or instance (per image and channel, "
                             "nnU-Net's choice: no statistics shared across a small batch).")
    height: Auto | Annotated[Int, Field(ge=32)] = Field(
        "auto", description="Working height; auto: the median aspect ratio within pixel_budget, a multiple of 32.")
    width: Auto | Annotated[Int, Field(ge=32)] = Field("auto", description="Working width; auto: as height.")
    pixel_budget: Auto | Annotated[Int, Field(ge=1024)] = Field(
        "auto", description="Pixels of the auto working size; auto: 12,288 on a CPU (96x128), 262,144 on a GPU.")
    object_pixels: Int = Field(
        1024, ge=0, description="Auto working size: both sides doubled where the median object would cover fewer "
                              "than this many pixels (0: off); 1024 = 32x32, one cell of the deepest feature "
                              "map at encoder_depth 5.")
    resize: Literal["stretch", "pad"] = Field(
        "stretch", description="To the working size: stretch, or keep the aspect ratio and reflect-pad.")
    budget: Auto | Annotated[Int, Field(ge=1)] = Field(
        "auto", description="Training image-steps (images per optimizer step x steps) over all trained folds, "
                            "spent by the plan on train_folds, epochs and batch_size where they are auto; auto: "
                            "budget_minutes' worth when that is set, else 24 x the training images, at most "
                            "max_minutes' worth.")
    budget_minutes: Float = Field(0.0, ge=0.0, description="Train for about this many minutes on this device "
                                                           "instead (0: off); the plan's throughput probe turns "
                                                           "them into image-steps.")
    max_minutes: Float = Field(60.0, ge=0.0, description="Cap on the auto budget: train for at most about this "
                                                         "many minutes on this device (0: no cap); an explicit "
                                                         "budget or budget_minutes is not capped.")
    min_fold_steps: Int = Field(1500, ge=1, description="Optimizer steps each trained fold gets at least (auto "
                                                       "train_folds): a small budget trains fewer, longer folds.")
    epochs: Auto | Annotated[Int, Field(ge=1)] = Field(
        "auto", description="Epochs per trained fold; auto: the budget spread over the trained folds.")
    batch_size: Auto | Annotated[Int, Field(ge=1)] = Field(
        "auto", description="Images per training step; auto: 8 on a CPU, more with GPU memory.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (one-cycle schedule) or sgd (Nesterov momentum 0.99, poly decay: nnU-Net's; "
                             "give it its own lr, e.g. 0.01).")
    lr: Float = Field(1e-3, gt=0.0, description="Peak learning rate (one-cycle for adamw, poly start for sgd).")
    weight_decay: Float = Field(1e-4, ge=0.0, description="Weight decay of the optimizer.")
    folds: Int = Field(4, ge=2, description="Subject-grouped folds.")
    train_folds: Auto | Annotated[Int, Field(ge=1)] = Field(
        "auto", description="Folds actually trained (0..train_folds-1), <= folds; auto: as many as the budget "
                            "gives min_fold_steps optimizer steps each, at least 1.")
    bce_weight: Float = Field(1.0, ge=0.0, description="Weight of the pixel BCE loss.")
    dice_weight: Float = Field(1.0, ge=0.0, description="Weight of the soft Dice loss.")
    presence_weight: Float = Field(0.5, ge=0.0, description="Weight of the presence BCE loss.")
    loss: Literal["bce_dice", "lovasz", "focal_dice"] = Field(
        "bce_dice", description="Mask loss: bce_dice (bce_weight x BCE + dice_weight x soft Dice), lovasz (per-image "
                                "Lovasz hinge), focal_dice (bce_weight x focal + dice_weight x soft Dice).")
    focal_gamma: Float = Field(2.0, ge=0.0, description="Focal loss exponent (loss: focal_dice; 0 is plain BCE).")
    dice_scope: Literal["image", "batch"] = Field(
        "image", description="Soft Dice per image with a nerve, averaged, or over the whole batch as one region "
                             "(nnU-Net's 2d batch Dice).")
    deep_supervision: Bool = Field(False, description="Also score the mask at the decoder's inner resolutions "
                                                       "(nnU-Net's deep supervision; training only).")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="The weights a fold keeps (best.pt): best, the epoch with the highest validation Dice "
                            "(tuned gate), or last, the final epoch's.")
    ema: Float = Field(0.0, ge=0.0, lt=1.0, description="Decay of an exponential moving average of the weights, "
                                                        "validated and saved as best.pt (0: off).")
    workers: Auto | Annotated[Int, Field(ge=0)] = Field(
        "auto", description="DataLoader worker processes (0: in the training process); auto: 0 on a CPU.")
    threads: Int = Field(0, ge=0, description="CPU threads (0: all cores, split between ranks).")
    amp: Bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.budget != "auto" and self.budget_minutes > 0:
            raise _cross("budget_minutes", f"{self.budget_minutes!r} is set, and so is train.budget "
                                           f"({self.budget}): set one of them")
        if self.train_folds != "auto" and self.train_folds > self.folds:
            raise _cross("train_folds", f"{self.train_folds} is more than train.folds ({self.folds})")
        if len(self.decoder_channels) != self.encoder_depth:
            raise _cross("decoder_channels", f"needs {self.encoder_depth} entries (one per train.encoder_depth "
                                             f"level), got {len(self.decoder_channels)}")
        return self


@dataclass(frozen=True, config=_CONFIG)
class DiagnosticsParams:
    """Training health and what the model learned (README "Diagnostics").

    Its own section, not train's: none of it changes the weights, so it is not in the resume hash.
    """
    enabled: Bool = Field(True, description="Write the end-of-training figures.")
    subset: Int = Field(32, ge=1, description="Fixed validation images for the step-0 check and the figures.")
    patience: Int = Field(4, ge=1, description="Epochs without improvement before a warning.")
    grad_vanish: Float = Field(1e-6, ge=0.0, description="Warn when a layer's mean gradient norm is below this.")
    grad_explode: Float = Field(1e3, gt=0.0, description="Warn when a step's gradient norm is above this.")


@dataclass(frozen=True, config=_CONFIG)
class TuneParams:
    """The joint search grid; each list must be non-empty (an empty axis would search nothing).

    Presence 0 and min area 0 switch those gates off, so the search can choose not to gate; the
    component rules are kept only where they beat the best score without them.
    """
    pixel_thresholds: tuple[Annotated[Float, Field(ge=0.0, le=1.0)], ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), min_length=1, description="Pixel is foreground when prob > this.")
    presence_thresholds: tuple[Annotated[Float, Field(ge=0.0, le=1.0)], ...] = Field(
        (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), min_length=1,
        description="Keep a mask when presence >= this; 0 (no gate) is chosen only when it beats the best gated "
                    "candidate by more than min_gain_se standard errors.")
    min_areas: Auto | Annotated[tuple[Annotated[Int, Field(ge=0)], ...], Field(min_length=1)] = Field(
        "auto", description="Keep a mask when its area >= this (native pixels); auto: min_area_fractions of "
                            "the median image area.")
    min_area_fractions: tuple[Annotated[Float, Field(ge=0.0, le=1.0)], ...] = Field(
        (0.0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012), min_length=1,
        description="Candidate minimum areas as fractions of the image (used by min_areas: auto).")
    keep_largest: Annotated[tuple[Bool, ...], Field(min_length=1)] = Field(
        (False, True), description="Candidates: keep only the largest 8-connected component of each mask.")
    min_component_fractions: tuple[Annotated[Float, Field(ge=0.0, le=1.0)], ...] = Field(
        (0.0, 0.0005, 0.001, 0.002), min_length=1,
        description="Candidates: drop 8-connected components smaller than this fraction of the image area. "
                    "Components off (no keep_largest, 0) is always a candidate and wins ties.")
    min_gain_se: Float = Field(
        1.0, ge=0.0, description="Choose, of the candidates the best does not beat on OOF Dice by more than this many "
                                 "standard errors of the per-image difference, the one nearest the untuned "
                                 "0.5 / 0.5 / 0 (0: the best).")


@dataclass(frozen=True, config=_CONFIG)
class PredictParams:
    """Test-set prediction."""
    tta_flip: Bool = Field(True, description="Also predict the horizontal mirror and average.")
    batch_size: Int = Field(32, ge=1, description="Test images per forward pass.")


@dataclass(frozen=True, config=_CONFIG)
class ReportParams:
    """The HTML report."""
    gallery_images: Int = Field(6, ge=1, description="Out-of-fold examples per gallery row.")


@dataclass(frozen=True, config=_CONFIG)
class Params:
    """The whole params.yaml."""
    seed: Annotated[Int, Field(ge=0, le=SEED_MAX)] = Field(42, description="Seed of every random choice.")
    data: DataParams = Field(DataParams(), description="Dataset location and layout.")
    synth: SynthParams = Field(SynthParams(), description="Synthetic dataset generator.")
    dedup: DedupParams = Field(DedupParams(), description="Near-duplicate detection.")
    clean: CleanParams = Field(CleanParams(), description="Training-set cleaning policy.")
    augment: AugmentParams = Field(AugmentParams(), description="Training-time augmentation.")
    train: TrainParams = Field(TrainParams(), description="Model and training.")
    diagnostics: DiagnosticsParams = Field(DiagnosticsParams(), description="Training diagnostics.")
    tune: TuneParams = Field(TuneParams(), description="Post-processing threshold search grid.")
    predict: PredictParams = Field(PredictParams(), description="Test-set prediction.")
    report: ReportParams = Field(ReportParams(), description="HTML report.")


# ---------------------------------------------------------------- errors

def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_at(cls: type, loc: tuple[Any, ...]) -> tuple[type | None, Any]:
    """The section class holding the last key of `loc`, and that key's annotation (None if unknown)."""
    hint: Any = cls
    owner: type | None = None
    for part in loc:
        if isinstance(part, int):      # an item of a tuple field
            args = typing.get_args(hint)
            hint = args[0] if args else None
            owner = None
            continue
        if not _is_section(hint):
            return None, None
        owner = hint
        hint = typing.get_type_hints(hint, include_extras=True).get(part)
    return owner, hint


def _bounds(hint: Any, cls: type, loc: tuple[Any, ...]) -> str:
    """The numeric bounds of the field at `loc`, as 'from 0 to 4294967295' / '>= 1', or ''."""
    found: dict[str, Any] = {}
    metadata: list[Any] = list(getattr(hint, "__metadata__", ()))
    owner, _ = _section_at(cls, loc)
    if owner is not None and isinstance(loc[-1], str):
        field = owner.__pydantic_fields__.get(loc[-1])  # type: ignore[attr-defined]
        metadata += list(field.metadata) if field is not None else []
    for m in metadata:
        for name in ("ge", "le", "gt", "lt"):
            if isinstance(m, getattr(annotated_types, name.capitalize())):
                found[name] = getattr(m, name)
        for inner in getattr(m, "metadata", ()):     # FieldInfo inside Annotated
            for name in ("ge", "le", "gt", "lt"):
                if isinstance(inner, getattr(annotated_types, name.capitalize())):
                    found[name] = getattr(inner, name)
    if "ge" in found and "le" in found:
        return f" from {found['ge']} to {found['le']}"
    words = {"ge": ">=", "le": "<=", "gt": ">", "lt": "<"}
    return "".join(f" {words[k]} {v}" for k, v in found.items())


def _dotted(prefix: str, loc: tuple[Any, ...]) -> str:
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}".lstrip(".")
    return key or "params"


def _message(cls: type, prefix: str, err: Any) -> str:
    """One pydantic error -> 'dotted.key: what is wrong (what was expected)'."""
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err["input"], err.get("ctx") or {}
    value = _Shown(_clip(repr(value)))   # echoed as {value!r}: a 50 MB value must not make a 50 MB line
    _, hint = _section_at(cls, loc)
    key = _dotted(prefix, loc)
    if kind == "invalid_key":
        return f"{_dotted(prefix, loc[:-1])}: key {value!r} is not a name"
    if kind == "cross_field":
        return f"{_dotted(prefix, (*loc, ctx['key']))}: {ctx['message']}"
    if kind == "two_names":
        return f"{key}: {value!r} {err['msg']}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{key}: expected an integer{_bounds(hint, cls, loc)}, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"{key}: expected a number{_bounds(hint, cls, loc)}, got {value!r}"
    if kind == "finite_number":
        return f"{key}: expected a finite number{_bounds(hint, cls, loc)}, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{key}: expected true or false, got {value!r}"
    if kind in ("string_type", "string_too_short"):
        return f"{key}: expected a non-empty string, got {value!r}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {ctx.get('expected')}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        word = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[kind]
        return f"{key}: {value!r} is out of range (must be {word} {next(iter(ctx.values()))})"
    if kind in ("too_short", "tuple_type", "list_type", "iterable_type"):
        return f"{key}: expected a non-empty list, got {value!r}"
    if kind in ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type"):
        return f"{key}: expected a mapping, got {value!r}"
    return f"{key}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {value!r}"


_UNION_TAG = re.compile(r"^(?:[a-z]+\[.*\]|constrained-\w+|int|float|str|bool)$")  # pydantic's union member names


def _params_error(cls: type, prefix: str, exc: ValidationError) -> ParamsError:
    """All of pydantic's errors, one line each, every line naming its dotted key; unknown keys grouped
    per section with that section's known keys."""
    lines: dict[tuple[Any, ...], str] = {}
    unknown: dict[tuple[Any, ...], list[str]] = {}
    may_be_auto: set[tuple[Any, ...]] = set()
    for err in exc.errors():
        if err["type"] == "unexpected_keyword_argument":
            unknown.setdefault(tuple(err["loc"][:-1]), []).append(str(err["loc"][-1]))
            continue
        tags = [p for p in err["loc"] if isinstance(p, str) and _UNION_TAG.match(p)]
        err = {**err, "loc": tuple(p for p in err["loc"] if p not in tags)}  # `auto | value`: the value's key
        field = tuple(part for part in err["loc"] if isinstance(part, str))
        if any(t.startswith("literal[") for t in tags):
            may_be_auto.add(field)   # the `auto` branch's complaint: said once, as "(or auto)"
            continue
        lines.setdefault(field, _message(cls, prefix, err))   # the first problem of each key only
    for field in may_be_auto & lines.keys():
        lines[field] += " (or auto)"
    for where, keys in unknown.items():
        section, _ = _section_at(cls, (*where, "_"))
        known = ", ".join(f.name for f in dataclasses.fields(section)) if section else "?"
        name = _dotted(prefix, where) if (prefix or where) else ""
        lines[("?", *where)] = (f"unknown key{'s' if len(keys) > 1 else ''}{f' in {name!r}' if name else ''}: "
                                f"{', '.join(_dotted(prefix, (*where, k)) for k in keys)} (known: {known})")
    return ParamsError("\n".join(lines.values()))


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Validate `raw` (a mapping, or None for all defaults) as section `cls` whose dotted name is `prefix`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    if cls is Params:   # an empty section (`train:` with nothing under it) means its defaults
        raw = {k: {} if v is None and k != "seed" else v for k, v in raw.items()}
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise _params_error(cls, prefix, exc) from None


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping (None: all defaults); raises ParamsError naming the bad key."""
    return _build(Params, raw, "")


def with_settings(params: Params, settings: Sequence[str]) -> Params:
    """`params` with `section.key=value` settings, each value parsed as params.yaml is (`3e-5` a
    number), validated together once all are in (so `train.encoder_depth=4` can come with the
    `train.decoder_channels` it needs); raises ValueError (ParamsError or pydantic's) for an unknown
    key, bad YAML or a bad value. For command lines that change knobs (the benchmarks' `--set`)."""
    raw = to_dict(params)
    for setting in settings:
        key, sep, value = setting.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and isinstance(raw.get(section), dict) and name in raw[section]):
            raise ParamsError(f"{setting!r}: expected section.key=value with a params.yaml key")
        try:
            raw[section][name] = parse_yaml(value)
        except yaml.YAMLError as exc:
            raise ParamsError(f"{setting!r}: {_yaml_problem(exc)}") from None
    return parse_params(raw)


# ---------------------------------------------------------------- YAML

MAX_PARAMS_BYTES = 1 << 20    # a params file is a few KB; a larger one is refused before it is parsed
MAX_PARAMS_NODES = 100_000    # YAML values after expanding aliases (an alias bomb expands exponentially)
MAX_SHOWN = 80                # characters of a value an error message echoes

# YAML 1.2's floats: `1e-5`, `1E5` and `.5e-3` are numbers, as DVC (`dvc exp run -S train.lr=1e-5` writes
# `lr: 1e-05`), JSON and people write them; PyYAML's YAML 1.1 rules need a dot and a signed exponent.
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _clip(text: str, most: int = MAX_SHOWN) -> str:
    """`text`, cut to `most` characters with how long it was (an error line must stay one short line)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} characters)"


class _Shown(str):
    """A value's repr, clipped: `f"{_Shown(...)!r}"` gives the clipped text itself."""

    def __repr__(self) -> str:
        return str(self)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    reads YAML 1.2 floats (`1e-5`) as numbers, and refuses more than MAX_PARAMS_NODES values once
    aliases are expanded."""

    yaml_implicit_resolvers = {
        first: [(tag, _FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique(node, "", set())
        if self._expanded_size(node, {}) > MAX_PARAMS_NODES:
            raise ParamsError(f"more than {MAX_PARAMS_NODES:,} values once YAML aliases are expanded "
                              "(an alias bomb, or an alias inside itself?)")
        return super().construct_document(node)

    def _expanded_size(self, node: yaml.Node, sizes: dict[int, int]) -> int:
        """How many values `node` stands for with every alias expanded (each shared node counted once)."""
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_PARAMS_NODES + 1   # a recursive anchor expands without end
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        size = 1
        for child in children:
            size = min(size + self._expanded_size(child, sizes), MAX_PARAMS_NODES + 1)
        sizes[id(node)] = size
        return size

    def _check_unique(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:   # an alias (or a recursive anchor) was checked where it was defined
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                name = f"{path}.{key_node.value}".lstrip(".") if isinstance(key_node, yaml.ScalarNode) else path
                line = key_node.start_mark.line + 1
                if key in first:
                    raise ParamsError(f"line {line}: duplicate key {name!r} (first given on line {first[key]})")
                first[key] = line
                self._check_unique(value_node, name, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique(item, f"{path}[{i}]", seen)


def parse_yaml(text: str | bytes) -> Any:
    """Parse params YAML as `load_params` does (unique keys, `1e-5` a number, aliases bounded); raises
    yaml.YAMLError or ParamsError. For every reader of a params file (e.g. the experiments page)."""
    if len(text) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{len(text):,} bytes (a params file is at most {MAX_PARAMS_BYTES:,})")
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ParamsError("values nested too deeply") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text adds a snippet over three lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, parse and validate a params file; every problem is one ParamsError starting with the path."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):   # a FIFO would block the read for ever
            raise ParamsError(f"{path}: not a regular file, so not a params file")
        if info.st_size > MAX_PARAMS_BYTES:
            raise ParamsError(f"{path}: {info.st_size:,} bytes; a params file is at most {MAX_PARAMS_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a directory, not a params file") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") \
            from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    try:
        return parse_params(parse_yaml(text))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({_clip(_yaml_problem(exc), 400)})") from None
    except ParamsError as exc:
        raise ParamsError("\n".join(f"{path}: {_clip(line, 400)}" for line in str(exc).splitlines())) from None


def to_dict(params: Any) -> dict[str, Any]:
    """Plain-dict view (tuples as lists), for writing back to YAML or JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(params))
