"""The exported bundle: one folder that takes an image file to a mask without this project's training stack.

`models/export/` (written by the export stage, read by `segment`) holds:

- `model.onnx`: the fold ensemble with its horizontal-flip views as one graph. Input `image`,
  float32 (batch, C, height, width): the image at the working size, scaled to [0, 1] (each fold's
  own normalisation `(x - mean) / std` happens inside the graph). Outputs `mask_prob` (batch, 1,
  height, width) and `presence_prob` (batch,): the averaged sigmoid probabilities.
- `bundle.json`: everything else, below; `model.sha256` is the SHA-256 of `model.onnx`, so a
  bundle whose description does not belong to its model is refused (`read_bundle`).
- `README.md`: how to use it without this project.

bundle.json keys (format 1): `format`, `format_version`, `model` (file, sha256, opset, input and
output names and shapes), `preprocess` (channels, in_channels, height, width, resize, scale,
the folds' normalisation), `ensemble` (folds, tta_flip, views), `postprocess` (the tuned
thresholds: pixel, presence, min_area, keep_largest, min_component), `rle` (order, start,
submission_columns, numeric_ids), `object_name`, `params_sha256`, `versions`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.artifacts import Thresholds
from pipeline.data.io import read_json, write_json, write_text
from pipeline.errors import InputError

FORMAT, FORMAT_VERSION = "nerveseg-bundle", 1
MODEL_FILE, META_FILE, README_FILE = "model.onnx", "bundle.json", "README.md"
INPUT, MASK_OUTPUT, PRESENCE_OUTPUT = "image", "mask_prob", "presence_prob"


class BundleError(InputError):
    """A bundle folder that is incomplete, of another format, or whose bundle.json does not match its model."""


def sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Bundle:
    """What `segment` needs from a bundle, read from bundle.json (`meta` holds all of it)."""
    folder: Path
    channels: str                   # gray or rgb: how images are read (pipeline.data.io.read_image)
    size: tuple[int, int]           # the working size (height, width)
    resize: str                     # stretch or pad (pipeline.deploy.resize)
    thresholds: Thresholds
    rle_order: str                  # numpy order: "F" (column-major) or "C"
    rle_start: int
    submission_columns: tuple[str, str]
    object_name: str
    meta: dict[str, Any]

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE


def write_bundle(folder: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Complete `meta` with the hash of `folder/model.onnx` (already written there) and write bundle.json
    and README.md beside it; returns the written meta."""
    folder = Path(folder)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    meta["model"] = {**meta["model"], "file": MODEL_FILE, "sha256": sha256(folder / MODEL_FILE)}
    write_json(folder / META_FILE, meta)
    write_text(folder / README_FILE, readme(meta))
    return meta


def _get(meta: Any, path: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = meta
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BundleError(f"{where}: missing key {path}")
        value = value[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is no number here
        raise BundleError(f"{where}: {path} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def read_bundle(folder: str | Path) -> Bundle:
    """Read and check a bundle folder: bundle.json of this format, model.onnx present and its SHA-256 equal
    to the one bundle.json records. Any problem is one BundleError naming the file."""
    folder = Path(folder)
    where = folder / META_FILE
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found (run the export stage: python -m pipeline export)")
    try:
        meta = read_json(where)
    except FileNotFoundError:
        raise BundleError(f"{where}: not found; {folder} is not an exported bundle") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{where}: not a {FORMAT} description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {meta.get('format_version')!r}; this pipeline reads "
                          f"{FORMAT_VERSION} (export the model again)")
    model = folder / MODEL_FILE
    if not model.is_file():
        raise BundleError(f"{model}: not found; the bundle is incomplete")
    recorded, actual = _get(meta, "model.sha256", str, where), sha256(model)
    if recorded != actual:
        raise BundleError(f"{model}: SHA-256 {actual[:12]}... does not match {recorded[:12]}... in {where}; "
                          "the model or its description was changed or mixed up (export again)")
    channels = _get(meta, "preprocess.channels", str, where)
    resize = _get(meta, "preprocess.resize", str, where)
    order = _get(meta, "rle.order", str, where)
    if channels not in ("gray", "rgb") or resize not in ("stretch", "pad") or order not in ("column", "row"):
        raise BundleError(f"{where}: preprocess.channels must be gray or rgb, preprocess.resize stretch or pad, "
                          f"rle.order column or row (got {channels!r}, {resize!r}, {order!r})")
    post = _get(meta, "postprocess", dict, where)
    names = [f.name for f in dataclasses.fields(Thresholds)]
    if set(post) != set(names):
        raise BundleError(f"{where}: postprocess must hold exactly {', '.join(names)}")
    thresholds = Thresholds(pixel=float(_get(meta, "postprocess.pixel", (int, float), where)),
                            presence=float(_get(meta, "postprocess.presence", (int, float), where)),
                            min_area=_get(meta, "postprocess.min_area", int, where),
                            keep_largest=_get(meta, "postprocess.keep_largest", bool, where),
                            min_component=float(_get(meta, "postprocess.min_component", (int, float), where)))
    columns = _get(meta, "rle.submission_columns", list, where)
    if len(columns) != 2 or not all(isinstance(c, str) for c in columns):
        raise BundleError(f"{where}: rle.submission_columns must be two column names")
    return Bundle(folder=folder, channels=channels,
                  size=(_get(meta, "preprocess.height", int, where), _get(meta, "preprocess.width", int, where)),
                  resize=resize, thresholds=thresholds, rle_order="F" if order == "column" else "C",
                  rle_start=_get(meta, "rle.start", int, where), submission_columns=(columns[0], columns[1]),
                  object_name=_get(meta, "object_name", str, where), meta=meta)


def readme(meta: dict[str, Any]) -> str:
    """The bundle's own README.md: how to go from an image file to a mask with any ONNX runtime."""
    pre, post, rle, ens = meta["preprocess"], meta["postprocess"], meta["rle"], meta["ensemble"]
    h, w, c = pre["height"], pre["width"], pre["in_channels"]
    resize = ("resize the whole image to the working size" if pre["resize"] == "stretch" else
              "scale it by min(1, height/H, width/W) (aspect ratio kept, never enlarged, rounded to whole "
              "pixels), place it top-left and fill the bottom and right by reflection (edge repetition when "
              "the pad is not smaller than the scaled image)")
    order = "column-major (down each column, then left to right)" if rle["order"] == "column" else "row-major"
    return f"""# {meta["object_name"]} segmentation model (exported bundle)

Made by `python -m pipeline export` (nerveseg). `bundle.json` holds every number below;
`model.onnx` is the whole model: {ens["folds"]} fold(s){" with horizontal-flip test-time augmentation" if ens["tta_flip"] else ""},
{ens["views"]} forward pass(es) averaged inside the graph. Check `model.sha256` in bundle.json before use.

## From an image file to a mask

1. Read the image as 8-bit {"grayscale (colour converted to luminance, ITU-R 601-2 as Pillow's `convert('L')`)" if pre["channels"] == "gray" else "RGB"}; native size H x W.
2. Scale to [0, 1] (divide by 255) and {resize}. The resize is bilinear with antialiasing
   (Pillow's / PyTorch's `antialias=True` triangle filter).
3. Feed `{meta["model"]["input"]["name"]}`: float32, shape (batch, {c}, {h}, {w}). Do not normalise: each fold's
   `(x - mean) / std` is inside the graph.
4. Outputs: `{MASK_OUTPUT}` (batch, 1, {h}, {w}), the foreground probability per pixel, and `{PRESENCE_OUTPUT}`
   (batch,), the probability that the image shows a {meta["object_name"]} at all.
5. Map `{MASK_OUTPUT}` back to H x W: {"" if pre["resize"] == "stretch" else "crop the scaled image's part, then "}bilinear
   interpolation with half-pixel centres (PyTorch `align_corners=False`, no antialiasing).
6. Threshold, in this order: pixels with probability > {post["pixel"]}; 8-connected components
   smaller than {post["min_component"]} x H x W pixels dropped{", then all but the largest" if post["keep_largest"] else ""};
   the whole mask emptied unless presence >= {post["presence"]} and its area >= {post["min_area"]} pixels.
7. Submission: `{rle["submission_columns"][0]},{rle["submission_columns"][1]}`, run-length encoded `start length`
   pairs, pixels numbered {order} from {rle["start"]}; an empty mask is an empty field.

With the project installed, `python -m pipeline segment --bundle <this folder> --images <folder>
--out <folder>` does all of this with ONNX Runtime (no PyTorch needed) and writes mask PNGs,
outline overlays and the submission CSV.
"""
