import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

from pipeline.data import rle
from pipeline.cli import app
from pipeline.data.rle import RLEError, SubmissionError


def _is_canonical(text: str, n: int) -> bool:
    """Sorted, maximal runs (no two touching) inside the image: what Kaggle's encoder writes."""
    starts, lengths = rle.parse_runs(text, n)
    return bool((starts[1:] > starts[:-1] + lengths[:-1]).all())


masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(lambda shape: arrays(bool, shape))


@settings(max_examples=300, deadline=None)
@given(masks)
def test_round_trip_random_masks(mask):
    text = rle.encode(mask)
    assert np.array_equal(rle.decode(text, mask.shape), mask)
    assert _is_canonical(text, mask.size)
    assert text == "" or text.split()[0] != "0"


@settings(max_examples=100, deadline=None)
@given(masks, st.sampled_from(["F", "C"]), st.sampled_from([0, 1]))
def test_round_trip_other_orders_and_starts(mask, order, start):
    assert np.array_equal(rle.decode(rle.encode(mask, order, start), mask.shape, order, start), mask)


@pytest.mark.parametrize("shape", [(420, 580), (1, 1), (1, 7), (7, 1), (5, 4)])
def test_round_trip_edge_cases(shape):
    h, w = shape
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    assert rle.encode(empty) == ""
    assert rle.encode(full) == f"1 {h * w}"
    border = full.copy()
    border[1:-1, 1:-1] = False
    corners = [(0, 0), (h - 1, 0), (0, w - 1), (h - 1, w - 1)]
    singles = []
    for r, c in corners:
        single = empty.copy()
        single[r, c] = True
        singles.append(single)
        assert rle.encode(single) == f"{c * h + r + 1} 1"  # column-major, 1-indexed
    for mask in [empty, full, border, *singles]:
        assert np.array_equal(rle.decode(rle.encode(mask), shape), mask)


def test_hand_checked_column_major_examples():
    m = np.array([[1, 0, 1],
                  [1, 0, 0],
                  [0, 1, 1]], bool)
    # pixels numbered down each column: 1 2 3 | 4 5 6 | 7 8 9 -> on: 1,2 and 6,7 (wraps a column) and 9
    assert rle.encode(m) == "1 2 6 2 9 1"
    assert rle.encode(m, order="C") == "1 1 3 2 8 2"  # row-major reading of the same mask
    assert rle.encode(m, start=0) == "0 2 5 2 8 1"
    assert np.array_equal(rle.decode("1 2 6 2 9 1", (3, 3)), m)
    tall = rle.decode("2 3", (4, 2))  # pixels 2-4: rows 1-3 of column 0
    assert tall[:, 0].tolist() == [False, True, True, True] and not tall[:, 1].any()
    wide = rle.decode("4 2", (3, 2))  # pixels 4-5: rows 0-1 of column 1
    assert wide.tolist() == [[False, True], [False, True], [False, False]]


def test_decode_accepts_touching_runs_and_empty_cells():
    assert rle.decode("1 2 3 2", (2, 2)).all()  # pixels 1-2 then 3-4
    for empty in ("", "   ", None, float("nan")):
        assert not rle.decode(empty, (2, 2)).any()


def test_decodes_the_loaded_training_masks_bit_for_bit(tiny_interim):
    from pipeline.data.artifacts import open_arrays

    _, truth = open_arrays(tiny_interim, "train")
    for mask in truth:
        assert np.array_equal(rle.decode(rle.encode(mask), mask.shape), mask.astype(bool))


@pytest.mark.parametrize("text, message", [
    ("1 2 3", "odd number"),
    ("0 2", "below 1"),
    ("-3 2", "below 1"),
    ("1 0", "not positive"),
    ("1 -2", "not positive"),
    ("5 2", "past the image"),  # pixels 5-6 of 5
    ("9223372036854775807 2", "at most 18 digits"),  # would overflow int64 and slip past the end check
    ("5 1 1 1", "not sorted"),
    ("1 3 2 1", "overlapping"),
    ("1 2 2 1", "overlapping"),
    ("1.5 2", "not an integer"),
    ("+1 2", "not an integer"),
    ("nan", "not an integer"),
    ("1,2", "not an integer"),
])
def test_parse_runs_rejects(text, message):
    with pytest.raises(RLEError, match=message):
        rle.parse_runs(text, 5)


def test_parse_runs_zero_indexed_reports_the_written_start():
    assert rle.parse_runs("0 5", 5, start=0)[0].tolist() == [1]
    with pytest.raises(RLEError, match=r"start -1 is below 0"):
        rle.parse_runs("-1 2", 5, start=0)
    with pytest.raises(RLEError, match="past the image"):
        rle.parse_runs("1 5", 5, start=0)


GOOD = "img,pixels\n1,1 2 5 1\n2,\n3,12 1\n"  # 3x4 images: 12 pixels


def _write(tmp_path, text):
    path = tmp_path / "submission.csv"
    path.write_text(text)
    return path


def test_validator_accepts_a_good_file(tmp_path):
    assert rle.validate_submission(_write(tmp_path, GOOD), ["1", "2", "3"], (3, 4)) == 3
    assert rle.validate_submission(_write(tmp_path, GOOD.replace("\n", "\r\n")), ["3", "2", "1"], (3, 4)) == 3


@pytest.mark.parametrize("text, message", [
    ("", "header must be 'img,pixels'"),
    ("id,pixels\n1,\n2,\n3,\n", "header must be 'img,pixels'"),
    ("img,pixels,extra\n1,,\n2,,\n3,,\n", "header must be"),
    ("1,1 2\n2,\n3,\n", "header must be"),
    ("img,pixels\n1,\n2,\n", "1 test id.s. missing, e.g. 3"),
    ("img,pixels\n1,\n2,\n3,\n3,\n", "3 is listed more than once"),
    ("img,pixels\n1,\n2,\n3,\n4,\n", "not in the test set, e.g. 4"),
    ("img,pixels\n1,\nx2,\n3,\n", "'x2' is not a numeric id"),
    ("img,pixels\n1,\n 2,\n3,\n", "' 2' is not a numeric id"),
    ("img,pixels\n1,\n,\n3,\n", "'' is not a numeric id"),
    ("img,pixels\n1,1 2 3\n2,\n3,\n", "id 1: odd number"),
    ("img,pixels\n1,5 1 1 1\n2,\n3,\n", "id 1: runs not sorted"),
    ("img,pixels\n1,1 3 2 1\n2,\n3,\n", "id 1: runs not sorted or overlapping"),
    ("img,pixels\n1,0 1\n2,\n3,\n", "id 1: start 0 is below 1"),
    ("img,pixels\n1,-1 1\n2,\n3,\n", "id 1: start -1 is below 1"),
    ("img,pixels\n1,1 0\n2,\n3,\n", "id 1: run length 0"),
    ("img,pixels\n1,1 -4\n2,\n3,\n", "id 1: run length -4"),
    ("img,pixels\n1,12 2\n2,\n3,\n", "id 1: run 12 2 ends past the image"),
    ("img,pixels\n1,13 1\n2,\n3,\n", "past the image"),
    ("img,pixels\n1,5,1 1\n2,\n3,\n", "line 2: expected 2 fields"),  # pandas would shift this silently
    ("img,pixels\n1\n2,\n3,\n", "line 2: expected 2 fields"),
])
def test_validator_rejects(tmp_path, text, message):
    with pytest.raises(SubmissionError, match=message):
        rle.validate_submission(_write(tmp_path, text), ["1", "2", "3"], (3, 4))


def test_validator_lists_every_problem_and_names_the_file(tmp_path):
    path = _write(tmp_path, "img,pixels\n1,0 1\n1,\n")
    with pytest.raises(SubmissionError) as info:
        rle.validate_submission(path, ["1", "2"], (3, 4))
    text = str(info.value)
    assert str(path) in text and "3 problem(s)" in text
    assert "below 1" in text and "more than once" in text and "missing, e.g. 2" in text


def test_validator_unreadable_and_missing_files(tmp_path):
    with pytest.raises(SubmissionError, match="not found"):
        rle.validate_submission(tmp_path / "absent.csv")
    path = tmp_path / "binary.csv"
    path.write_bytes(b"img,pixels\n1,\xff\xfe\n")
    with pytest.raises(SubmissionError, match="not a readable CSV"):
        rle.validate_submission(path)


def test_validator_other_columns_and_zero_start(tmp_path):
    path = _write(tmp_path, "id,rle_mask\nab,0 12\n")
    assert rle.validate_submission(path, ["ab"], (3, 4), columns=("id", "rle_mask"), start=0, numeric_ids=False) == 1
    with pytest.raises(SubmissionError, match="not a numeric id"):
        rle.validate_submission(path, None, (3, 4), columns=("id", "rle_mask"), start=0)


def test_validate_cli(tmp_path):
    runner = CliRunner()
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for i in (1, 2, 3):
        (test_dir / f"{i}.tif").write_bytes(b"")
    good = _write(tmp_path, GOOD)
    result = runner.invoke(app, ["validate", str(good), "--test-dir", str(test_dir), "--height", "3", "--width", "4"])
    assert result.exit_code == 0 and "valid (3 rows)" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("img,pixels\n1,0 1\n2,\n3,\n")
    result = runner.invoke(app, ["validate", str(bad), "--test-dir", str(test_dir), "--height", "3", "--width", "4"])
    assert result.exit_code == 1 and "below 1" in result.output and "Traceback" not in result.output


def test_validator_line_numbers_count_blank_lines(tmp_path):
    """Blank lines are skipped, but still counted: the error names the line the bad row is on."""
    path = _write(tmp_path, 'img,pixels\n\n1,\n\n\n2,0 1\n"3",\n\n9,\n')
    with pytest.raises(SubmissionError) as info:
        rle.validate_submission(path, ["1", "2", "3"], (3, 4))
    assert "line 6: id 2: start 0 is below 1" in str(info.value)
    assert "2 problem(s)" in str(info.value) and "1 id(s) not in the test set, e.g. 9" in str(info.value)
    quoted = _write(tmp_path, 'img,pixels\n"a\nb",\n\nc,0 1\n')  # a quoted field spanning two lines
    with pytest.raises(SubmissionError, match="line 2: id 'a\\\\nb' contains a line break"):
        rle.validate_submission(quoted, None, (3, 4), numeric_ids=False)
    with pytest.raises(SubmissionError, match="line 5: id c: start 0"):
        rle.validate_submission(quoted, None, (3, 4), numeric_ids=False)


def test_validator_refuses_a_folder_and_a_header_with_one_name_twice(tmp_path):
    with pytest.raises(SubmissionError, match="is a folder, not a CSV file"):
        rle.validate_submission(tmp_path)
    path = _write(tmp_path, "img,img\n1,\n")
    with pytest.raises(SubmissionError, match="two different column names.*'img,img'.*data.submission_columns"):
        rle.validate_submission(path, ["1"], (3, 4), columns=("img", "img"))


@pytest.mark.parametrize("img", ["a,b", 'q"x', 'both,"', "ü,ñ"])
def test_submission_writer_quotes_fields_for_a_round_trip(tmp_path, img):
    import pandas as pd

    path = tmp_path / "sub.csv"
    rows = [(img, "1 2"), ("plain", "")]
    rle.write_submission(path, rows, ("id", "rle_mask"))
    assert rle.validate_submission(path, [img, "plain"], (3, 4), columns=("id", "rle_mask"), numeric_ids=False) == 2
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["id", "rle_mask"] and list(table.itertuples(index=False, name=None)) == rows
    assert rle.read_rows(path)[1:] == [list(r) for r in rows]


def test_one_numeric_id_rule_and_the_id_check():
    from pipeline.data.ids import id_problem, id_sort_key, numeric_ids
    from pipeline.params import DataParams

    assert numeric_ids(DataParams()) and numeric_ids(DataParams(layout="ultrasound"))
    assert not numeric_ids(DataParams(layout="folders")) and not numeric_ids(DataParams(layout="csv"))
    assert id_problem("17", numeric=True) is None and id_problem("a1f0", numeric=False) is None
    assert "not a numeric id" in id_problem("\u0661", numeric=True)  # an Arabic-Indic digit
    assert id_problem("", numeric=False) == "is empty"
    for bad in ("a\nb", "a\rb", "a\tb", " ab", "ab "):
        assert id_problem(bad, numeric=False) is not None, bad
    rle.check_ids(["1", "2", "10"], True, "m.csv")
    rle.check_ids(["a,b", 'q"x'], False, "m.csv")
    with pytest.raises(SubmissionError, match=r"(?s)m\.csv: 1 image id.*plain numbers.*id '3a' is not a numeric id"):
        rle.check_ids(["1", "3a"], True, "m.csv")
    with pytest.raises(SubmissionError, match=r"id 'a\\nb' contains a line break"):
        rle.check_ids(["a\nb"], False, "m.csv")
    with pytest.raises(SubmissionError, match=r"2 id.s. listed more than once: '1', '2'"):
        rle.check_ids(["1", "2", "1", "2", "3"], True, "m.csv")
    with pytest.raises(SubmissionError, match="not valid UTF-8"):
        rle.check_ids(["bad\udcff"], False, "m.csv")
    assert sorted(["10", "b", "2", "a"], key=id_sort_key) == ["2", "10", "a", "b"]


def _test_dir(tmp_path, shape=(3, 4)):
    from pipeline.data.io import write_tiff

    test_dir = tmp_path / "test"
    for i in (1, 2, 3):
        write_tiff(test_dir / f"{i}.tif", np.zeros(shape, np.uint8))
    (test_dir / "._1.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble: not an image
    return test_dir


def test_validate_against_test_images_skips_dot_files_and_reads_their_size(tmp_path):
    from pipeline.params import DataParams

    test_dir = _test_dir(tmp_path)
    assert rle.validate_submission_file(_write(tmp_path, GOOD), test_dir=test_dir, data=DataParams()) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("img,pixels\n1,12 2\n2,\n3,\n")
    with pytest.raises(SubmissionError, match="ends past the image .12 pixels."):  # 3x4, not 420x580
        rle.validate_submission_file(bad, test_dir=test_dir, data=DataParams())
    assert rle.validate_submission_file(bad, test_dir=test_dir, height=3, width=5, data=DataParams()) == 3


@pytest.mark.parametrize("size, message", [
    ({"height": -5}, "--height must be a positive whole number of pixels, got -5"),
    ({"width": 0}, "--width must be a positive whole number of pixels, got 0"),
    ({"height": 3, "width": 0}, "--width must be a positive"),
])
def test_validate_against_refuses_sizes_that_are_not_positive(tmp_path, size, message):
    from pipeline.data.io import InputError

    with pytest.raises(InputError, match=message):
        rle.validate_submission_file(_write(tmp_path, GOOD), **size)


def test_validate_against_uses_the_data_conventions(tmp_path):
    from pipeline.params import DataParams

    path = _write(tmp_path, "id,rle_mask\nab,0 12\n")
    data = DataParams(layout="folders", submission_columns=("id", "rle_mask"), rle_start=0)
    assert rle.validate_submission_file(path, height=3, width=4, data=data) == 1
    with pytest.raises(SubmissionError, match="'ab' is not a numeric id"):  # the ultrasound layout's rule
        rle.validate_submission_file(path, height=3, width=4,
                                        data=DataParams(submission_columns=("id", "rle_mask"), rle_start=0))
    with pytest.raises(SubmissionError, match="is a folder"):
        rle.validate_submission_file(tmp_path, data=data)


def test_validator_accepts_a_line_over_128_kib(tmp_path):
    """A valid mask of many runs at 420x580 makes a line longer than the csv module's default field limit
    (128 KiB); predict runs this validator on its own output, so it must read it."""
    mask = np.zeros(rle.KAGGLE_SHAPE, bool)
    mask[::2, :] = True    # every other pixel of each column: 121,800 runs
    pixels = rle.encode(mask)
    assert len(pixels) > 131072
    path = tmp_path / "submission.csv"
    rle.write_submission(path, [("1", pixels), ("2", "")], ("img", "pixels"))
    assert rle.validate_submission(path, ["1", "2"]) == 2
    assert rle.validate_submission_file(path) == 2


@pytest.mark.parametrize("pixels, message", [
    ("1\t2", r"separator '\\t' at position 2"), ("1  2", "double space at position 3"),
    (" 1 2", "leading space at position 1"), ("1 2 ", "trailing space at position 4"),
    ("1\u00a02", r"separator '\\xa0' at position 2"), ("1\u30002", r"separator '\\u3000' at position 2"),
    ("1 \u0662", "'\u0662' is not an integer"), ("1\v2", r"separator '\\x0b'")])
def test_runs_are_separated_by_single_ascii_spaces(tmp_path, pixels, message):
    path = tmp_path / "submission.csv"
    rle.write_submission(path, [("1", pixels)], ("img", "pixels"))
    with pytest.raises(SubmissionError, match=f"line 2: id 1: {message}"):
        rle.validate_submission(path, ["1"], (3, 4))


def test_validator_refuses_a_fifo_without_opening_it(tmp_path):
    import os

    fifo = tmp_path / "submission.csv"
    os.mkfifo(fifo)
    with pytest.raises(SubmissionError, match=r"submission.csv: a FIFO \(named pipe\), not a CSV file"):
        rle.validate_submission(fifo, ["1"], (3, 4))
