"""The report stage: key numbers on the page and in the summary, graceful gaps, per-image OOF scores read
from the tune stage (no torch), and the page as a person sees it in a real headless browser (Debian's Chromium).
The experiments table is the compare command's (tests/test_compare.py)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data import artifacts
from pipeline.stages import report
from pipeline.data.io import write_csv
from pipeline.data.artifacts import open_arrays, read_manifest
from pipeline.params import Params, ReportParams
from pipeline.data.artifacts import read_thresholds
from pipeline.model.postprocess import keep

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TUNE = {"dice_best": 0.81234, "dice_default": 0.70111, "dice_no_presence_gate": 0.6502, "dice_all_empty": 0.5333,
        "images": 30, "candidates": 4, "best_pixel": 0.5, "best_presence": 0.6, "best_min_area": 0}


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30), value, np.uint8)).save(path)


@pytest.fixture
def run_dir(tmp_path: Path, tiny_interim: Path) -> Path:
    """Every stage's outputs, faked small: OOF from the true masks with a few deliberate mistakes."""
    r = tmp_path / "reports"
    for stage, data in {"load": {"train_images": 30, "empty_fraction": 0.5333}, "dedup": {"pairs": 17},
                        "clean": {"kept": 27, "dropped": 3}, "tune": TUNE,
                        "train": {"dice": 0.74567, "fold_0": {"dice": 0.74567, "best_epoch": 2},
                                  "fold_1": {"dice": 0.61234, "best_epoch": 3}},
                        "predict": {"synthetic_test_dice": 0.79876, "test_images": 6}}.items():
        (r / stage).mkdir(parents=True)
        (r / stage / "metrics.json").write_text(json.dumps(data))
    (r / "tune" / "grid.csv").write_text("pixel,presence,min_area,dice\n0.4,0.6,0,0.8\n0.5,0.6,0,0.81234\n"
                                         "0.5,0.4,0,0.75\n0.5,0.6,500,0.7\n")
    curves = r / "train" / "plots" / "metrics" / "fold_0"
    curves.mkdir(parents=True)
    for name, values in {"train_loss": [0.9, 0.6, 0.5], "val_loss": [1.0, 0.7, 0.65], "val_dice": [0.5, 0.7, 0.74]}.items():
        (curves / f"{name}.tsv").write_text("timestamp\tstep\t" + name + "\n"
                                            + "".join(f"0\t{k + 1}\t{v}\n" for k, v in enumerate(values)))
    _png(r / "dedup" / "gallery.png")
    _png(r / "augment" / "preview.png", 200)

    manifest = read_manifest(tiny_interim)
    train = manifest[manifest.split == "train"]
    _, masks = open_arrays(tiny_interim, "train")
    truth = np.asarray(masks[train.row.to_numpy()], np.float32)
    prob = truth[:, ::2, ::2].astype(np.float16)  # working size = half the native size
    presence = train.has_mask.astype(bool).to_numpy().astype(np.float32)
    presence[:2] = 1 - presence[:2]  # two presence mistakes
    (tmp_path / "oof").mkdir()
    np.savez(tmp_path / "oof" / "oof.npz", ids=train.id.to_numpy().astype(str), mask_prob=prob,
             presence_prob=presence)
    (tmp_path / "thresholds.json").write_text('{"pixel": 0.5, "presence": 0.6, "min_area": 0}')
    _scores(tmp_path, tiny_interim)
    return tmp_path


def _scores(d: Path, interim: Path) -> None:
    """What the tune stage writes beside its grid: per-image scores at the chosen thresholds."""
    from pipeline.stages import tune

    ids, mask_prob, presence = artifacts.read_oof(d / "oof")
    _, masks = open_arrays(interim, "train")
    scores = tune.oof_scores(ids, mask_prob, presence, masks, tune.train_rows(interim, ids)[0],
                             read_thresholds(d / "thresholds.json"))
    write_csv(d / "reports" / "tune" / "oof_scores.csv", scores)


def _run(d: Path, interim: Path) -> tuple[str, str]:
    report.run(Params(report=ReportParams(gallery_images=4)), reports=d / "reports", interim=interim, oof=d / "oof",
               thresholds=d / "thresholds.json", html=d / "reports" / "index.html",
               summary=d / "reports" / "summary.md")
    return (d / "reports" / "index.html").read_text(), (d / "reports" / "summary.md").read_text()


def _confusion(d: Path, interim: Path, gate: float = 0.6) -> tuple[int, int, int, int]:
    data = np.load(d / "oof" / "oof.npz")
    manifest = read_manifest(interim).set_index("id")
    truth = manifest.loc[data["ids"], "has_mask"].astype(bool).to_numpy()
    said = keep(data["presence_prob"], 0, gate, 0)
    return (int((said & truth).sum()), int((~said & truth).sum()), int((said & ~truth).sum()),
            int((~said & ~truth).sum()))


def test_key_numbers_in_html_and_summary(run_dir, tiny_interim):
    page, summary = _run(run_dir, tiny_interim)
    for text in (page, summary):
        for number in ("0.8123", "0.7011", "0.5333", "0.7988", "0.7457", "0.6502"):
            assert number in text, number
        assert "python -m pipeline compare" in text and "Experiments ranked by Dice" not in text
    tp, fn, fp, tn = _confusion(run_dir, tiny_interim)
    assert (fp, fn) != (0, 0), "the fixture must contain presence mistakes"
    assert f"| truth: nerve | {tp} | {fn} |" in summary and f"| truth: empty | {fp} | {tn} |" in summary
    assert "missing" not in summary
    assert "presence >= 0.6 (the tuned presence gate)" in summary and "switched the gate off" not in summary
    for title in ("Dice vs thresholds", "Presence classifier", "Nerves found", "False positives on empty images",
                  "Missed nerves", "dedup audit", "Augmentation preview", "Training curves"):
        assert title in page and title in summary, title
    assert "](dedup/gallery.png)" in summary and "](augment/preview.png)" in summary


def test_per_fold_metrics_are_one_column_per_fold(run_dir, tiny_interim):
    _, summary = _run(run_dir, tiny_interim)
    assert "| metric | fold_0 | fold_1 |" in summary
    assert "| dice | 0.7457 | 0.6123 |" in summary and "| best_epoch | 2 | 3 |" in summary
    assert "fold_0.dice" not in summary


def test_presence_gate_off_also_shows_the_default_gate(run_dir, tiny_interim):
    (run_dir / "thresholds.json").write_text('{"pixel": 0.5, "presence": 0.0, "min_area": 0}')
    _scores(run_dir, tiny_interim)  # tune writes both together
    _, summary = _run(run_dir, tiny_interim)
    n = len(np.load(run_dir / "oof" / "oof.npz")["ids"])
    tp, fn, fp, tn = _confusion(run_dir, tiny_interim, 0.5)
    assert "presence >= 0 (the tuned presence gate)" in summary and f"| truth: empty | {n - tp - fn} | 0 |" in summary
    assert "presence >= 0.5 (the default gate; tuning switched the gate off)" in summary
    assert f"| truth: nerve | {tp} | {fn} |" in summary and f"| truth: empty | {fp} | {tn} |" in summary


def test_self_contained_every_image_embedded(run_dir, tiny_interim):
    page, _ = _run(run_dir, tiny_interim)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) >= 7  # thresholds, confusion, 3 gallery rows, dedup, augment, curves
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<script|<link|\bhref=\"(?!#)|url\(", page), "no external or script resources"


def test_missing_stages_still_render(tmp_path, tiny_interim):
    page, summary = _run(tmp_path, tiny_interim)
    for stage in ("load", "dedup", "clean", "train", "tune", "predict"):
        assert f"reports/{stage}/metrics.json: missing" in summary
    assert "thresholds file not found" in summary and "run the augment stage" in summary
    assert "<img" not in page


def test_report_imports_neither_torch_nor_the_tune_stage():
    """The report reads what tune wrote; importing it must not pull in torch or pipeline.stages.tune (nor compare)."""
    code = ("import sys, pipeline.stages.report; "
            "print(sorted(m for m in ('torch', 'pipeline.stages.tune', 'pipeline.model.network', 'pipeline.pages.compare') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_confusion_and_gallery_numbers_come_from_tunes_scores(run_dir, tiny_interim):
    """Mark every image's truth as non-empty in oof_scores.csv: the report follows the file, not the masks."""
    path = run_dir / "reports" / "tune" / "oof_scores.csv"
    scores = pd.read_csv(path, dtype={"id": str, "rle": str}, keep_default_na=False)
    n, said = len(scores), int((scores.presence_prob >= 0.6).sum())
    scores["truth_empty"] = False
    scores.to_csv(path, index=False)
    _, summary = _run(run_dir, tiny_interim)
    assert f"| truth: nerve | {said} | {n - said} |" in summary and "| truth: empty | 0 | 0 |" in summary
    assert f"over {n} images" in summary and "False positives on empty images: most confident first (0)" in summary


def test_stale_or_missing_scores_are_a_note(run_dir, tiny_interim):
    path = run_dir / "reports" / "tune" / "oof_scores.csv"
    scores = pd.read_csv(path, dtype={"id": str, "rle": str}, keep_default_na=False)
    scores.loc[3, "presence_prob"] = 0.123  # train re-ran, tune did not
    scores.to_csv(path, index=False)
    page, summary = _run(run_dir, tiny_interim)
    assert f"Not available: {path} does not describe the out-of-fold predictions" in summary
    assert "run the tune stage again" in summary and "Nerves found" not in summary
    assert "Dice vs thresholds" in page  # the rest of the page is there
    path.unlink()
    _, summary = _run(run_dir, tiny_interim)
    assert f"Not available: {path}: not found (run the tune stage)" in summary


def test_report_cli_keeps_its_options(run_dir, tiny_interim):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (run_dir / "params.yaml").write_text("report:\n  gallery_images: 2\n")
    r = run_dir / "reports"
    result = CliRunner().invoke(app, ["report", "--reports", str(r), "--interim", str(tiny_interim), "--oof",
                                      str(run_dir / "oof"), "--thresholds", str(run_dir / "thresholds.json"),
                                      "--html", str(r / "index.html"), "--summary", str(r / "summary.md"),
                                      "--params", str(run_dir / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "missing_stage_metrics: none" in result.output
    assert "Nerves found: from best to worst Dice" in (r / "summary.md").read_text()


HARNESS = """<script>
window.addEventListener("error", e => document.body.setAttribute("data-js-error", String(e.message)));
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute("data-check", `images=${imgs.length} broken=${broken}`);
});
</script></body>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install -y --no-install-recommends chromium; .ci/run does this)")
def test_page_renders_in_headless_chromium(run_dir, tiny_interim):
    page, _ = _run(run_dir, tiny_interim)
    checked = run_dir / "checked.html"  # the page plus a test-only script reporting image decoding and JS errors
    checked.write_text(page.replace("</body>", HARNESS))
    out = _chromium("--dump-dom", checked.as_uri(), profile=run_dir / "profile")
    assert out.returncode == 0, out.stderr[-2000:]
    n_images = page.count("<img ")
    assert f'data-check="images={n_images} broken=0"' in out.stdout, out.stdout[:500]
    assert not re.search(r"<body[^>]*data-js-error", out.stdout), "JavaScript error while loading the page"
    assert not re.search(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror", out.stderr), out.stderr[-2000:]
    for number in ("0.8123", "0.7988", "python -m pipeline compare"):
        assert number in out.stdout
    shot = run_dir / "report.png"
    out = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", (run_dir / "reports" / "index.html").as_uri(),
                    profile=run_dir / "profile")
    assert out.returncode == 0 and shot.exists()
    with Image.open(shot) as img:
        assert img.size == (1280, 2400) and len(img.convert("L").getcolors(256) or ()) > 50  # not a blank page


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1)])
def test_report_on_tiny_images_skips_the_outlines_it_cannot_draw(tmp_path, shape):
    """Images under 2x2 pixels: matplotlib cannot contour them (TypeError); the page still renders."""
    from pipeline.stages import load
    from pipeline.data.io import write_tiff

    raw = tmp_path / "raw"
    for s in (1, 2):
        for i in (1, 2, 3):
            mask = np.zeros(shape, np.uint8)
            if i != 3:  # nerves found and, with presence below, missed and false positives
                mask.flat[0] = 255
            write_tiff(raw / "train" / f"{s}_{i}.tif", np.full(shape, 40 * i, np.uint8))
            write_tiff(raw / "train" / f"{s}_{i}_mask.tif", mask)
    write_tiff(raw / "test" / "1.tif", np.zeros(shape, np.uint8))
    interim = tmp_path / "interim"
    load.run(Params(), raw=raw, out=interim, metrics=tmp_path / "load.json", fingerprint=tmp_path / "fingerprint.json")
    train = read_manifest(interim).query("split == 'train'")
    _, masks = open_arrays(interim, "train")
    prob = np.asarray(masks[train.row.to_numpy()], np.float32)
    presence = train.has_mask.astype(bool).to_numpy().astype(np.float32)
    presence[[0, 2]] = 1 - presence[[0, 2]]  # one nerve missed, one false positive:
    prob[2] = 1.0  # an empty image predicted all foreground
    (tmp_path / "oof").mkdir()
    np.savez(tmp_path / "oof" / "oof.npz", ids=train.id.to_numpy().astype(str), mask_prob=prob,
             presence_prob=presence)
    (tmp_path / "thresholds.json").write_text('{"pixel": 0.5, "presence": 0.5, "min_area": 0}')
    _scores(tmp_path, interim)
    page, summary = _run(tmp_path, interim)
    for title in ("Nerves found: from best to worst Dice (3)", "False positives on empty images: most confident "
                  "first (1)", "Missed nerves: largest first (1)", "presence >= 0.5"):
        assert title in summary, title
    assert page.count("data:image/png;base64,") == 4  # the confusion matrix and three gallery rows


def test_words_follow_the_data_object_name_and_groups(run_dir, tiny_interim):
    """data.object_name names what the masks outline; "groups" replaces "subjects" when each image is one."""
    from pipeline.params import DataParams

    d = run_dir
    (d / "reports" / "load" / "metrics.json").write_text(json.dumps(
        {"train_images": 30, "subjects": 30, "group_kind": "image", "empty_fraction": 0.5333}))
    report.run(Params(data=DataParams(object_name="salt"), report=ReportParams(gallery_images=4)),
               reports=d / "reports", interim=tiny_interim, oof=d / "oof", thresholds=d / "thresholds.json",
               html=d / "reports" / "index.html", summary=d / "reports" / "summary.md")
    page, summary = (d / "reports" / "index.html").read_text(), (d / "reports" / "summary.md").read_text()
    tp, fn, fp, tn = _confusion(d, tiny_interim)
    assert "<title>salt segmentation report</title>" in page
    for text in (page, summary):
        assert "Salt segmentation: run report" in text
        for words in ("Salts found: from best to worst Dice", "Missed salts: largest first",
                      "false positives on empty images", "groups (one image each)"):
            assert words in text, words
        assert f"{tp} salts found" in text and f"{fn} salts missed" in text and "true salt;" in text
        assert "nerve" not in text.lower().replace("nerveseg", ""), "no nerve words left on a salt report"
        assert "| subjects |" not in text
    assert f"| truth: salt | {tp} | {fn} |" in summary and "| predicted: salt | predicted: empty |" in summary
    assert "| groups (one image each) | 30 |" in summary


def test_default_words_are_the_nerve_ones(run_dir, tiny_interim):
    (run_dir / "reports" / "load" / "metrics.json").write_text(json.dumps(
        {"train_images": 30, "subjects": 3, "group_kind": "subject"}))
    page, summary = _run(run_dir, tiny_interim)
    assert "<title>nerve segmentation report</title>" in page and "Nerve segmentation: run report" in summary
    assert "| subjects | 3 |" in summary and "groups (one image each)" not in summary
    assert report._plural("artery") == "arteries" and report._plural("mass") == "masses"
    assert report._plural("salt deposit") == "salt deposits" and report._plural("day") == "days"


def test_training_time_sets_the_plans_estimate_against_the_actual_time() -> None:
    estimate = {"train_seconds": 300.0, "image_steps": 4864,
                "probe": {"train_seconds_per_image": 0.05, "device": "cpu", "threads": 2}}
    line = report.training_time(estimate, {"train_seconds": 250.0})
    assert "estimated 5.0 min for 4,864 image-steps" in line and "20.0 images/s on cpu, 2 threads" in line
    assert "took 4.2 min (estimate / actual 1.20)" in line
    assert "no actual time yet" in report.training_time(estimate, None)
    assert "made no estimate" in report.training_time(None, {"train_seconds": 250.0})
    assert "made no estimate" in report.training_time({"train_seconds": "soon"}, None)  # hand-edited: no traceback
    assert "capped" not in line
    capped = report.training_time({**estimate, "budget_capped_from": 76_800}, None)
    assert "capped at train.max_minutes (76,800 image-steps uncapped)" in capped and "timed" not in capped
    checked = report.training_time({**estimate, "budget_capped_from": 76_800, "probe_rechecks": 4}, None)
    assert "(the probe timed 5 times before a cap, the fastest kept)" in checked
