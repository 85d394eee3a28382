"""Every example in README.md and docs/*.md is run or checked here, so that the docs stay true.

Fenced blocks, by their language tag:

* ``python``: run. The blocks of one file run in order in one namespace (a session, as a reader
  types them), in a temporary folder. The names an example leaves to the reader are provided:
  ``calib`` (8 images) and ``images`` (4 images), and ``timm.create_model(name, pretrained=True)``
  builds a tiny random-init model of the same architecture instead of downloading weights
  (``tiny_pretrained``). Everything else is the example's own code.
* ``bash``: every command line is checked without running it (the commands need ImageNet, the
  shared model or minutes of calibration): ``ptq4vit ...`` (also ``python -m ptq4vit``,
  ``torchrun ... -m ptq4vit``) must parse with the command line's own parser, and ``bash X.sh`` /
  ``python X.py`` must name a script of this repository that accepts every option used.
* ``text``: not an example (a layout, an output).
* A block right after ``<!-- not run: REASON -->`` is neither run nor checked; ``NOT_RUN`` lists how
  many each file has, so none is skipped silently.

A fence without one of these tags fails. Inline commands that run a script of this repository
(```python benchmarks/x.py --opt ...```) are checked the same way, wherever they appear.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
#: Blocks marked ``<!-- not run: ... -->``, per file. Update it together with the marks.
NOT_RUN = {"README.md": 1}

#: The tiny stand-in for a pretrained ViT/DeiT: depth 1, 32-px images (see ``tiny_pretrained``).
TINY_VIT = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2, num_classes=10)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    not_run: str | None  # the reason, when marked

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^( *)```(\S*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language, start = len(m.group(1)), m.group(2), i
        i += 1
        body = []
        while not re.match(r"^ *```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        mark = _NOT_RUN.match(lines[start - 1]) if start > 0 else None
        found.append(Block(path, start + 1, language, "\n".join(body) + "\n", mark.group(1) if mark else None))
        i += 1
    return found


ALL_BLOCKS = [b for p in DOCS for b in blocks(p)]


def test_every_fence_has_a_known_language_and_every_skip_a_reason():
    untagged = [f"{b} ({b.language or 'no tag'})" for b in ALL_BLOCKS if b.language not in LANGUAGES]
    assert not untagged, f"tag these blocks as one of {LANGUAGES}: {untagged}"
    assert all(b.not_run for b in ALL_BLOCKS if b.not_run is not None), "a not-run mark needs a reason"
    counts: dict[str, int] = {}
    for b in ALL_BLOCKS:
        if b.not_run is not None:
            counts[str(b.path.relative_to(REPO))] = counts.get(str(b.path.relative_to(REPO)), 0) + 1
    assert counts == NOT_RUN


# ---- python blocks

@pytest.fixture
def tiny_pretrained(monkeypatch):
    """``timm.create_model(name, pretrained=True)`` gives a tiny random-init model of the same architecture
    (ViT/DeiT: depth 1, 32-px images, 10 classes); every other call is timm's own."""
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if not pretrained:
            return real(name, pretrained=False, **kwargs)
        if "swin" in name:
            raise NotImplementedError("no tiny stand-in for Swin in the docs tests yet")
        torch.manual_seed(0)
        return real(name, pretrained=False, **{**kwargs, **TINY_VIT})

    monkeypatch.setattr(timm, "create_model", create_model)


def _python_sessions():
    by_file: dict[Path, list[Block]] = {}
    for b in ALL_BLOCKS:
        if b.language == "python" and b.not_run is None:
            by_file.setdefault(b.path, []).append(b)
    return [pytest.param(bs, id=str(p.relative_to(REPO))) for p, bs in by_file.items()]


@pytest.mark.parametrize("session", _python_sessions())
def test_python_examples_run(session, tiny_pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(1)
    namespace = {"__name__": "__docs__",
                 "calib": torch.randn(8, 3, 32, 32, generator=generator),
                 "images": torch.randn(4, 3, 32, 32, generator=generator)}
    for block in session:
        try:
            exec(compile(block.text, str(block), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the example at {block} fails: {type(e).__name__}: {e}") from e


def test_the_python_sessions_cover_the_api_examples():
    """The documented sessions exist (a renamed tag would otherwise drop them from the test above)."""
    names = {str(b.path.relative_to(REPO)) for b in ALL_BLOCKS if b.language == "python" and b.not_run is None}
    assert {"README.md", "docs/deployment.md", "docs/models.md"} <= names


def test_quantization_disabled_runs_the_weights_the_model_holds(tiny_pretrained, tmp_path):
    """What the README says of ``quantization_disabled()``: after a plain calibration the layers keep the
    float weights; a loaded checkpoint holds the dequantized ones; bias correction shifts the biases."""
    import ptq4vit

    model = timm.create_model("deit_small_patch16_224", pretrained=True).eval()
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    float_state = model.state_dict()
    q = ptq4vit.quantize(model, calib, "ptq4vit", 8, 8, progress=False, n_candidates=10, rounds=1)
    state = q.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in float_state.items())
    ptq4vit.save(q, tmp_path / "q.safetensors")
    loaded = ptq4vit.load(tmp_path / "q.safetensors").model.state_dict()
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], float_state["blocks.0.attn.qkv.weight"])
    corrected = ptq4vit.quantize(model, calib, "deploy8", 8, 8, progress=False).model.state_dict()
    assert not torch.equal(corrected["blocks.0.mlp.fc2.bias"], float_state["blocks.0.mlp.fc2.bias"])


# ---- command lines

def _commands(text: str) -> list[str]:
    """The command lines of a bash block: continuation lines joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _option_names(argv: list[str]) -> list[str]:
    """The ``--options`` in ``argv``, also inside optional parts written ``[--set FIELD=VALUE]``."""
    return [name for a in argv for name in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", a)]


def _cli_option_strings(command: str) -> set[str]:
    from ptq4vit.harness.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def check_script(path_text: str, argv: list[str]) -> None:
    """A script of this repository that accepts every option in ``argv``."""
    path = REPO / path_text
    assert path.is_file(), f"{path_text} does not exist"
    source = path.read_text(encoding="utf-8")
    # A shell script that hands its other arguments to `ptq4vit sweep` accepts sweep's options too.
    passed_on = _cli_option_strings("sweep") if path.suffix == ".sh" and "ptq4vit sweep" in source else set()
    for name in _option_names(argv):
        known = (f'"{name}"' in source or f"'{name}'" in source) if path.suffix == ".py" else name in source
        assert known or name in passed_on, f"{path_text} has no option {name}"


def check_ptq4vit(argv: list[str]) -> None:
    """``argv`` parses with the ``ptq4vit`` command line's own parser (nothing is run)."""
    from ptq4vit.harness.cli import build_parser
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`ptq4vit {' '.join(argv)}` does not parse (exit status {e.code})") from None
    assert args.command, f"`ptq4vit {' '.join(argv)}` names no command"


def check_command(line: str) -> None:
    argv = shlex.split(line, comments=True)
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # environment assignments
        argv = argv[1:]
    if argv[0] == "ptq4vit":
        return check_ptq4vit(argv[1:])
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "ptq4vit"]:
        return check_ptq4vit(argv[3:])
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "ptq4vit":
        return check_ptq4vit(argv[argv.index("-m") + 2:])
    if argv[0] == "bash" or (argv[0] in ("python", "python3") and argv[1].endswith(".py")):
        return check_script(argv[1], argv[2:])
    raise AssertionError(f"no check for the command {line!r}: mark its block not run, or teach test_docs.py")


def _bash_blocks():
    return [pytest.param(b, id=str(b)) for b in ALL_BLOCKS if b.language == "bash" and b.not_run is None]


@pytest.mark.parametrize("block", _bash_blocks())
def test_command_line_examples_parse(block):
    commands = _commands(block.text)
    assert commands, f"{block}: an empty bash block"
    for line in commands:
        try:
            check_command(line)
        except AssertionError as e:
            raise AssertionError(f"{block}: {e}") from None


_INLINE_SCRIPT = re.compile(r"`((?:[A-Z_]+=\S+ )?(?:python3?|bash)\s+(?:benchmarks|scripts|examples)/[^`]+)`")


def _inline_commands():
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in _INLINE_SCRIPT.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(pytest.param(" ".join(m.group(1).split()), id=f"{path.relative_to(REPO)}:{line}"))
    return found


@pytest.mark.parametrize("command", _inline_commands())
def test_inline_script_commands_name_real_scripts_and_options(command):
    argv = command.split()
    while re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    check_script(argv[1], argv[2:])


# ---- lists that must follow the code

def test_the_preset_lists_name_every_preset():
    from ptq4vit import PRESETS, RECIPES
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| `([a-z0-9-]+)` \|", readme.split("## Recipes", 1)[1].split("\n## ", 1)[0], re.M)
    assert table == list(RECIPES) == list(PRESETS)
    cli = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    listed = re.search(r"`--preset` takes one or more of (.*?) \(", cli, re.S).group(1)
    assert re.findall(r"`([a-z0-9-]+)`", listed) == list(PRESETS)


def test_the_docs_cite_no_issue_numbers():
    cited = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in DOCS
             for m in re.finditer(r"\bissues? #?\d+", p.read_text(encoding="utf-8"), re.I)]
    assert not cited
