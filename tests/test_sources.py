"""Sources: CSV files as real files come (blank lines, ragged rows, duplicate headers, missing
values, huge integers), each problem an error naming the file, the line and the column."""

import numpy as np
import pytest

from mpstream import OperatorError
from mpstream.pipeline import Pipeline


def read_csv(tmp_path, text, parallelism=1):
    path = tmp_path / "in.csv"
    path.write_text(text)
    p = Pipeline()
    p.from_csv("src", str(path), parallelism=parallelism).collect("out")
    return p.run()["out"]


@pytest.mark.parametrize("parallelism", [1, 2])
def test_blank_lines_are_ignored(tmp_path, parallelism):
    out = read_csv(tmp_path, "k,v\n1,2.5\n\n3,4\n\n\n", parallelism)
    assert sorted(zip(out["k"].tolist(), out["v"].tolist())) == [(1, 2.5), (3, 4.0)]
    assert out["k"].dtype == np.int64 and out["v"].dtype == np.float64


@pytest.mark.parametrize("text, message", [
    ("k,v\n1,2\n3\n", r"in\.csv, line 3: 1 field, the header has 2"),
    ("k,v\n1,2\n3,4,5\n", r"in\.csv, line 3: 3 fields, the header has 2"),
    ("k,v,k\n1,2,3\n", r"in\.csv, line 1: column 'k' appears twice in the header"),
    ("k,v\n1,2\n2,\n", r"in\.csv, line 3: column 'v' has an empty field"),
    ("k,v\n1,2\n99999999999999999999999,3\n", r"in\.csv, line 3: column 'k'.*does not fit in int64"),
    ("", r"in\.csv: empty CSV file"),
])
def test_malformed_csv_is_an_error_naming_file_line_and_column(tmp_path, text, message):
    with pytest.raises(OperatorError, match=r"(?s)operator 'src'.*" + message):
        read_csv(tmp_path, text)


def test_an_empty_field_of_a_text_column_is_an_empty_string(tmp_path):
    out = read_csv(tmp_path, "name,v\nx,1\n,2\n")
    assert out["name"].to_numpy().tolist() == ["x", ""] and out["v"].tolist() == [1, 2]
