"""What a person watching `clcli train` sees: the live block whole in a real terminal of 80 and 120 columns (tmux),
and, without a terminal (a pipe, a CI log), every record on a line of its own."""
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _helpers import tiny_args

STEP_TIMES = re.compile(r"(\d+)/(\d+) +(\d+:\d\d:\d\d) +eta +(\d+:\d\d:\d\d)")  # N/M, elapsed, ETA: all whole
# rich's own variables that would make it take a pipe for a terminal or set its width from outside
RICH_ENV = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RICH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _live_block_is_whole(lines: list[str]) -> bool:
    """The bar's line has the epoch, N/M (N < M: still running), the elapsed time, an ETA and images/s; each
    network's line has its accuracy and every CL loss part, the last one's three decimals included."""
    bar = [line for line in lines if STEP_TIMES.search(line)]
    if not bar or not re.search(r"epoch \d+/\d+", bar[0]) or not re.search(r"[\d.,]+ img/s$", bar[0].rstrip()):
        return False
    done, total = map(int, STEP_TIMES.search(bar[0]).groups()[:2])
    networks = [line for line in lines if re.match(r"^ +test_(resnet|efficientnet) +acc +[\d.]+% +loss \d+\.\d{3} "
                                                   r"+metric \d+\.\d{3} +ver \d+\.\d{3}$", line.rstrip())]
    return done < total and len(networks) == 2


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (a real terminal of a fixed size)")
def test_the_live_display_is_whole_in_a_terminal_of_80_and_120_columns(tmp_path):
    # A tiny CL run with many small steps (two epochs of 625) in a tmux pane of each width; the panes are read while
    # the bar is live, and the runs stopped there.
    args = [a if a != "--no-progress" else "--force" for a in tiny_args("OUT", epochs=2)]
    for small, many_steps in (("data.train_limit=256", "data.train_limit=8192"), ("train.batch_size=32",
                              "train.batch_size=8"), ("data.test_limit=200", "data.test_limit=16"),
                              ("train.threads=2", "train.threads=1")):
        args[args.index(small)] = many_steps
    args += ["--set", "train.log_every=2"]
    socket = Path(tempfile.mkdtemp(prefix="tmux", dir="/tmp")) / "s"  # a server of its own (short: a socket path)
    tmux = ["tmux", "-S", str(socket), "-f", "/dev/null"]
    env = _env()
    try:
        for width in (80, 120):
            run = ["env", *(f"-u{k}" for k in RICH_ENV), "TERM=xterm-256color", f"PYTHONPATH={env['PYTHONPATH']}",
                   sys.executable, "-m", "clcli", *(str(tmp_path / f"run{width}") if a == "OUT" else a for a in args)]
            command = f"cd {shlex.quote(str(tmp_path))} && {shlex.join(run)}; sleep 600"  # the pane stays readable
            subprocess.run([*tmux, "new-session", "-d", "-s", f"w{width}", "-x", str(width), "-y", "30", command],
                           check=True, env=env)
        seen: dict[int, list[str]] = {}
        last: dict[int, list[str]] = {80: [], 120: []}
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            for width in (80, 120):
                if width not in seen:
                    # -J joins the lines the terminal wrapped, so a line wider than the pane shows as one line
                    pane = subprocess.run([*tmux, "capture-pane", "-pJ", "-t", f"w{width}"], capture_output=True,
                                          text=True).stdout.splitlines()
                    last[width] = pane
                    if _live_block_is_whole(pane):
                        seen[width] = pane
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        shutil.rmtree(socket.parent, ignore_errors=True)
    missing = [width for width in last if width not in seen]
    assert not missing, "\n".join(f"the live block was never seen whole at {width} columns:\n" + "\n".join(last[width])
                                   for width in missing)
    for width, pane in seen.items():
        assert [line for line in pane if len(line.rstrip()) > width] == [], f"a line runs past {width} columns"
        assert any(line.startswith("cl  test_resnet + test_efficientnet") for line in pane)


def test_piped_training_puts_every_record_on_a_line_of_its_own(tmp_path):
    args = [a if a != "train.threads=2" else "train.threads=1" for a in tiny_args(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-m", "clcli", *[a for a in args if a != "--no-progress"]],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # the live block, printed once at the end: the method and networks, the finished bar, a line per network
    assert any(STEP_TIMES.search(line) and "16/16" in line and "img/s" in line for line in lines), done.stdout
    assert sum(bool(re.match(r"^ +test_(resnet|efficientnet) +acc .* ver \d+\.\d{3}$", line)) for line in lines) == 2
    assert sum(line.startswith("epoch ") and "test_resnet" in line for line in lines) == 2
    for line in lines:  # each record starts its line: none follows another on the same line
        assert all(m.start() == 0 for m in re.finditer(r"epoch \d+/\d+", line)), line
        assert line.count(" acc ") <= 1 and line.count("img/s") <= 1, line
        for record in ("test accuracy (%)", "run folder:", "cl  test_resnet"):
            assert record not in line or line.startswith(record), line


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120])
def test_the_live_block_never_runs_past_the_width_nor_cuts_a_number(width):
    from rich.console import Console

    from clcli.train._display import LiveProgress

    buffer = io.StringIO()
    progress = LiveProgress(True, 7800, "cl  resnet10t + mobilenetv3_small_050", Console(file=buffer, width=width),
                            epoch="epoch 2/10")
    progress.advance(1)
    progress.update(4623, "1,234 img/s", [(name, {"loss": 1.802, "metric": 0.312, "ver": 1998.125}, 36.2)
                                          for name in ("resnet10t", "mobilenetv3_small_050")], "epoch 6/10")
    progress.stop()
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = " ".join(lines)
    for whole in ("epoch 6/10", "4623/7800", "eta ", "1,234 img/s", "resnet10t", "mobilenetv3_small_050",
                  "acc  36.2%", "loss 1.802", "metric 0.312", "ver 1998.125"):
        assert whole in text, (whole, lines)
    assert STEP_TIMES.search(text), lines
    if width >= 80:  # the bar's numbers and each network's numbers stay on one line
        assert any(STEP_TIMES.search(line) and "img/s" in line and "epoch 6/10" in line for line in lines)
        assert any(line.startswith("  mobilenetv3_small_050  acc") and "ver" in line for line in lines)
