"""Every failure a user can cause on the command line: one line naming the problem, exit code 2."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError


def test_every_project_error_derives_from_the_one_base() -> None:
    from lorakit.api import TargetError
    from lorakit.core.variant import ConfigError
    from lorakit.io import AdapterFileError
    from lorakit.privacy.config import PrivacyError
    from lorakit.quant_api import QuantizationError
    from lorakit.train.data import DataError
    from lorakit.train.models import ModelError

    for cls in (
        TargetError,
        ConfigError,
        AdapterFileError,
        PrivacyError,
        QuantizationError,
        DataError,
        ModelError,
    ):
        assert issubclass(cls, LorakitError) and issubclass(cls, ValueError), cls


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback(where, capsys) -> None:
    argv = ["eval", "--adapter", "/nonexistent"]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(LorakitError, match="not a lorakit adapter directory"):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])
