"""The commands in README.md and docs/*.md are what this version accepts: every documented `clcli` command line
parses (a renamed flag fails here before it fails a user), and README's first block runs in order as written, on
less data."""
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clcli.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
# Appended to every `clcli train` of README's first block: the same commands on less data, in seconds.
SMALL = ["--epochs", "1", "--no-progress", "--set", "data.train_limit=128", "--set", "data.test_limit=64"]

runner = CliRunner()


def code_blocks(path: Path) -> list[list[str]]:
    """The shell code blocks of a markdown file, as their lines (continuations joined)."""
    blocks, current, language = [], None, None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None:
                current, language = [], stripped[3:].strip()
            else:
                if language in SHELL_BLOCKS:
                    blocks.append(_join_continuations(current))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


def _join_continuations(lines: list[str]) -> list[str]:
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append(pending + line)
            pending = ""
    return joined


def clcli_commands(line: str) -> list[list[str]]:
    """The clcli argument lists on one shell line: `clcli ...`, `... && clcli ...`, `torchrun ... -m clcli ...`;
    comments and output redirections dropped."""
    commands = []
    for part in line.split("&&"):
        if not part.lstrip().startswith(("clcli ", "torchrun ")):  # output shown in a block, not a command
            continue
        words = shlex.split(part, comments=True)
        if "clcli" not in words:
            continue
        at = words.index("clcli")
        if at > 0 and words[at - 1] != "-m":
            continue
        args = words[at + 1:]
        for redirect in (">", "|"):
            if redirect in args:
                args = args[:args.index(redirect)]
        commands.append(args)
    return commands


DOCUMENTED = [(path.relative_to(REPO).as_posix(), " ".join(args)) for path in DOCUMENTS
              for block in code_blocks(path) for line in block for args in clcli_commands(line)]


def test_the_documents_have_commands():
    files = {f for f, _ in DOCUMENTED}
    assert {"README.md", "docs/cli.md"} <= files and len(DOCUMENTED) > 30


@pytest.mark.parametrize("where,command", DOCUMENTED)
def test_every_documented_command_parses(where, command):
    """Each command with --help appended: every option it names exists (click rejects an unknown option before it
    shows the help), without running anything."""
    result = runner.invoke(app, [*shlex.split(command), "--help"])
    assert result.exit_code == 0, f"{where}: clcli {command}\n{result.output}"


def _in_repo(args: list[str]) -> list[str]:
    """Paths the README names inside the checkout (docs/examples/), made absolute: the commands run elsewhere."""
    return [str(REPO / a) if a.startswith("docs/") else a for a in args]


def test_readme_first_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/, exported/ and probe.png land here, as in a fresh checkout
    first = code_blocks(REPO / "README.md")[0]
    commands = [args for line in first for args in clcli_commands(line)]
    assert [c[0] for c in commands] == ["train", "report", "export", "predict", "probe"]
    outputs = {}
    for args in commands:
        args = _in_repo(args) + (SMALL if args[0] == "train" else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"clcli {' '.join(args)}\n{result.output}"
        outputs[args[0]] = result.output
    assert (tmp_path / "runs" / "quickstart" / "curves.png").is_file()
    assert "top 3 of 10 classes" in " ".join(outputs["predict"].split()) and (tmp_path / "probe.png").is_file()


def test_no_merge_conflict_is_left_in_the_documents():
    # A conflicted merge once committed docs/architecture.md with both sides in it.
    left = [f"{path.relative_to(REPO)}:{n}" for path in DOCUMENTS
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line.rstrip() == "======="]
    assert not left, left
