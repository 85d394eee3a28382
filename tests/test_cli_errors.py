"""The command line shows one line for a user's mistake and the traceback for a bug."""
import logging

import pytest

from ptq4vit import UserError
from ptq4vit.harness import cli
from ptq4vit.harness.cli.common import Command


def _replace_models_command(monkeypatch, run):
    monkeypatch.setitem(cli.COMMANDS, "models", Command("models", "test stand-in", run))


def test_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def run(args):
        raise UserError("no such folder /nowhere\n(check the path)")
    _replace_models_command(monkeypatch, run)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "ptq4vit: error: no such folder /nowhere (check the path)\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def run(args):
        raise ValueError("internal invariant broken")  # a plain ValueError is a bug, not bad input
    _replace_models_command(monkeypatch, run)
    with pytest.raises(ValueError, match="internal invariant broken"):
        cli.main(["models"])


@pytest.mark.parametrize("flag, level", [("-q", logging.WARNING), (None, logging.INFO), ("-v", logging.DEBUG)])
def test_verbosity_flags_set_the_log_level(monkeypatch, flag, level):
    _replace_models_command(monkeypatch, lambda args: 0)
    assert cli.main(([flag] if flag else []) + ["models"]) == 0
    assert logging.getLogger("ptq4vit").level == level
