"""support/report.py's guarantee: a header and its rows share their columns, numbers one way."""

from support import report


def test_header_and_rows_share_columns():
    lines = report.table(("cf", "text"), [(1.0, 0.5), (12.5, 0.125)], ("5.2f", "8.1%"))
    assert lines == ["      cf     text", "    1.00    50.0%", "   12.50    12.5%"]
    assert len({len(line) for line in lines}) == 1


def test_width_and_joined():
    assert [report.width(s) for s in (">10", "7.2f", "9.0%", ".1%")] == [10, 7, 9, 0]
    assert report.joined([0.5, 0.25], "6.1%", "  ") == " 50.0%   25.0%"


def test_a_report_is_written_as_text_and_strict_json(tmp_path):
    import json
    import math

    import numpy as np

    out = report.write(tmp_path / "out", ["line one", "line two"],
                       {"curve": np.array([0.5, np.nan]), "count": np.int64(3), "empty": math.nan,
                        "nested": {"pair": (1, 2.5)}})
    assert (out / "report.txt").read_text() == "line one\nline two\n"
    text = (out / "analysis.json").read_text()
    assert "NaN" not in text  # strict JSON: a parser that refuses NaN reads it
    assert json.loads(text) == {"curve": [0.5, None], "count": 3, "empty": None,
                                "nested": {"pair": [1, 2.5]}}


def test_a_header_wider_than_its_spec_widens_its_column():
    lines = report.table(("checkpoint", "layer 1"), [("1", 0.5), ("20", 1.0)], (">6", "9.0%"))
    assert lines == ["   checkpoint   layer 1", "            1       50%", "           20      100%"]
    assert len({len(line) for line in lines}) == 1
