"""`clcli --help` as a terminal shows it: each command's summary in the list is one whole sentence, and a line ends
only where the terminal's width ends it (rich keeps a docstring's own line breaks, mid-sentence); the same on each
command's own --help page."""
import pytest
from typer.testing import CliRunner

from clcli.cli import app

COMMANDS = ["probe", "train", "export", "eval", "predict", "bench", "compare", "report", "recipes"]
runner = CliRunner()


def rendered_help(args: list[str], columns: int) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def command_summaries(help_text: str) -> tuple[dict[str, list[str]], int]:
    """The rows of the Commands panel: each command's summary as its rendered lines, and the width of the summaries'
    column (what the panel's border leaves)."""
    lines = help_text.splitlines()
    start = next(k for k, line in enumerate(lines) if "─ Commands ─" in line)
    summaries, width, column, name = {}, None, None, None
    for line in lines[start + 1:]:
        if not line.startswith("│"):
            break
        inside = line[2:-2]  # "│ " ... " │"
        if not inside.startswith(" "):  # a command's first row: its name, then the summaries' column
            name = inside.split()[0]
            column = len(inside) - len(inside[len(name):].lstrip())
            width = len(inside) - column
            summaries[name] = []
        summaries[name].append(inside[column:].rstrip())
    return summaries, width


def description_paragraphs(help_text: str) -> tuple[list[list[str]], int]:
    """A command's own help page: the paragraphs between its usage line and its first panel, as rendered lines, and
    their width (one space of padding each side)."""
    lines = help_text.splitlines()
    start = next(k for k, line in enumerate(lines) if "Usage:" in line)
    paragraphs, current = [], []
    for line in lines[start + 1:]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else []), len(lines[start]) - 2


def assert_wrapped_only_at_the_width(rows: list[str], width: int, what: str) -> None:
    # a line the terminal ended could not take the next word; a shorter one was ended by a line break of the text
    for row, following in zip(rows, rows[1:]):
        assert len(row) + 1 + len(following.split()[0]) > width, f"{what}: a line break mid-sentence\n" + \
            "\n".join(rows)


@pytest.mark.parametrize("columns", [80, 100])
def test_each_command_summary_is_a_whole_sentence_wrapped_only_at_the_terminal_width(columns):
    summaries, width = command_summaries(rendered_help([], columns))
    assert set(COMMANDS) <= set(summaries)
    for name, rows in summaries.items():
        assert_wrapped_only_at_the_width(rows, width, name)
        summary = " ".join(rows)
        assert summary.endswith("."), f"{name}: the summary is no whole sentence: {summary}"


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_page_breaks_lines_only_at_the_terminal_width(command, columns):
    paragraphs, width = description_paragraphs(rendered_help([command], columns))
    assert paragraphs, f"{command} --help shows no description"
    for rows in paragraphs:
        assert_wrapped_only_at_the_width(rows, width, f"{command} --help")
