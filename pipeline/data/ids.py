"""Image ids in submissions: the one rule for which ids a submission can hold, and their row order.

Why one module: the load stage (test images), predict (before any model runs) and `pipeline
validate` must agree on it, or a dataset passes load and fails at the end of predict.
"""
from __future__ import annotations

import re

from pipeline.params import DataParams

_NUMERIC = re.compile(r"[0-9]+")          # ASCII only: `\d` would also take e.g. Arabic-Indic digits
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def numeric_ids(data: DataParams) -> bool:
    """Whether submission ids must be plain numbers: the Kaggle ultrasound layout's test images are
    `N.tif`; the other layouts take any file stem."""
    return data.layout == "ultrasound"


def id_problem(image_id: str, numeric: bool) -> str | None:
    """Why `image_id` cannot be a submission id, as a phrase that follows "id 'X' "; None when it can.

    A comma or double quote is fine (submissions are written with CSV quoting); a line break or
    other control character, leading or trailing whitespace (readers strip it), an empty id or
    text that is not UTF-8 are not, nor anything but ASCII digits where ids must be numeric.
    """
    if numeric and not _NUMERIC.fullmatch(image_id):
        return "is not a numeric id (ASCII digits 0-9, as this submission format needs)"
    if not image_id:
        return "is empty"
    if _CONTROL.search(image_id):
        return "contains a line break or another control character"
    if image_id != image_id.strip():
        return "has leading or trailing whitespace (CSV readers strip it)"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text (an undecodable file name?)"
    return None


def id_sort_key(image_id: str) -> tuple[int, int, str]:
    """Submission row order: numeric ids by value, then any others by text."""
    return (0, int(image_id), image_id) if _NUMERIC.fullmatch(image_id) else (1, 0, image_id)
