"""The command line of examples/run_diverse.py, parsed from the argument dataclasses (`scripts.arguments` and the
training arguments): a value outside an option's choices exits with the parser's message, an unknown flag is named
with the closest known one."""

from __future__ import annotations

import pytest
from fixtures.scripts import load_script


def test_unknown_regularizer_option_is_reported_by_the_parser(tmp_path, capsys):
    module = load_script()
    with pytest.raises(SystemExit) as excinfo:
        module.main(["--output_dir", str(tmp_path), "--weight_estimator", "lanczos"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'lanczos'" in capsys.readouterr().err


def test_unknown_flag_is_reported_with_the_closest_flag(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match=r"'--patch_cosine_coeff'.*did you mean --patch_cosine_coef\?.*--help"):
        module.main(["--output_dir", str(tmp_path), "--patch_cosine_coeff", "0.1"])
