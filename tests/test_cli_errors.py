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


# ---- bad input of every command: one line naming the input, exit status 2, nothing written

def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptq4vit: error: "), err
    for n in needles:
        assert str(n) in err[0], err[0]


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_file_and_folder_arguments_of_quantize_sweep_report(tiny_cli_args, cifar_dir, tmp_path, capsys):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    (tmp_path / "adir").mkdir()
    out = tmp_path / "out"
    quant = ["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8", "--out", str(out)]
    before = _files(tmp_path)
    cases = [
        (quant + ["--results", str(tmp_path / "adir")], ["results file", tmp_path / "adir", "is a folder"]),
        (quant + ["--results", str(blocker / "r.jsonl")], [blocker / "r.jsonl", "not a folder"]),
        (quant[:-2] + ["--out", str(blocker / "runs")], ["output folder", blocker / "runs"]),
        (quant + ["--val-dir", str(tmp_path / "nowhere")], [tmp_path / "nowhere", "does not exist"]),
        (quant + ["--calib-dir", str(blocker)], [blocker]),
        (["sweep", "--models", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-sizes", "8",
          "--out", str(out), "--results", str(tmp_path / "adir")], ["results file", tmp_path / "adir"]),
        (["report", str(tmp_path / "missing.jsonl")], ["results file", tmp_path / "missing.jsonl", "does not exist"]),
        (["report", str(tmp_path / "adir")], ["results file", tmp_path / "adir", "not a file"]),
    ]
    for argv, needles in cases:
        assert cli.main(argv) == 2, argv
        _one_line(capsys, *needles)
    assert _files(tmp_path) == before
    # --weights: a file that is not there (random-init excluded: it would conflict)
    args = [a for a in quant if a != "--random-init"] + ["--weights", str(tmp_path / "w.safetensors")]
    assert cli.main(args) == 2
    _one_line(capsys, tmp_path / "w.safetensors", "does not exist")
    assert _files(tmp_path) == before


def test_report_activations_is_checked_before_the_report_is_written(tiny_cli_args, tmp_path, capsys):
    """A deploy8 run keeps attention float: there is no post-softmax grid to plot, which is known before any
    report file is written (as a missing report folder parent is)."""
    out = tmp_path / "runs"
    assert cli.main(["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "8",
                     "--preset", "deploy8", "--out", str(out)]) == 0
    capsys.readouterr()
    results = out / "results.jsonl"
    rep = tmp_path / "rep"
    assert cli.main(["report", str(results), "--out", str(rep), "--activations"]) == 2
    _one_line(capsys, "attn.matmul2", "keeps attention float")
    assert not rep.exists()
    assert cli.main(["report", str(results), "--out", str(rep), "--activations", "--layer", "7"]) == 2
    _one_line(capsys, "block index 7 out of range")
    assert cli.main(["report", str(results), "--out", str(rep), "--activations", "--calib-dir",
                     str(tmp_path / "nocalib")]) == 2
    _one_line(capsys, tmp_path / "nocalib", "does not exist")
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    assert cli.main(["report", str(results), "--out", str(blocker / "rep")]) == 2
    _one_line(capsys, "report folder", blocker / "rep")
    assert not rep.exists()
    assert cli.main(["report", str(results), "--out", str(rep), "--no-plots"]) == 0  # without --activations it reports
    assert (rep / "report.md").is_file()


def _offline_hub(monkeypatch, tmp_path, offline: bool):
    """No Hugging Face cache and no network: any socket use, and any attempt to build the model, fails the test."""
    import socket

    import huggingface_hub
    import timm

    from ptq4vit.harness import zoo

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(timm, "create_model", no_network)
    monkeypatch.setattr(zoo, "_hub_reachable", {})


def test_quantize_hub_model_offline_is_one_line_at_once(cifar_dir, tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 and weights not cached: one line, no request made (so no minute of retries), nothing written."""
    _offline_hub(monkeypatch, tmp_path, offline=True)
    out = tmp_path / "out"
    argv = ["quantize", "--model", "ViT-Ti/224", "--data", str(cifar_dir), "--val-split", "test", "--calib-dir",
            str(cifar_dir / "calib"), "--calib-size", "8", "--limit", "1", "--workers", "0", "--out", str(out)]
    assert cli.main(argv) == 2
    _one_line(capsys, "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "not in the local Hugging Face cache",
              "HF_HUB_OFFLINE", "--weights")
    assert not out.exists()


def test_hub_that_does_not_answer_is_asked_once(tmp_path, monkeypatch):
    """Online mode, hub unreachable: one short request (no retries), then a UserError; the model is never built."""
    import huggingface_hub

    from ptq4vit.harness import zoo
    _offline_hub(monkeypatch, tmp_path, offline=False)
    requests = []

    class Unreachable:
        def head(self, url, timeout):
            requests.append((url, timeout))
            raise ConnectionError("simulated: no route to host")

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Unreachable())
    for _ in range(2):
        with pytest.raises(UserError, match=r"deit_tiny_patch16_224.fb_in1k are not in the local Hugging Face cache "
                                            r"and the hub does not answer \(ConnectionError: simulated"):
            zoo.create("DeiT-Ti/224")
    assert requests == [("https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors",
                         zoo.HUB_PROBE_TIMEOUT)]
