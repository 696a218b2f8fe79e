"""Progress output: a tqdm bar on a terminal, throttled plain lines elsewhere."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphinfer.progress import ProgressBar, ProgressLines, open_progress
from tests.conftest import ROOT, DemoTraining

# The start of a log line written by graphinfer.logs.TextFormatter.
LOG_LINE_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} INFO ")


class FakeTerminal(io.StringIO):
    """An in-memory stream whose isatty() returns True."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    """A monotonic clock that returns the next of the given readings on each call."""

    def __init__(self, *readings: float) -> None:
        self._readings: Iterator[float] = iter(readings)

    def __call__(self) -> float:
        return next(self._readings)


def plain_lines(
    description: str, total: int, readings: list[float], *, unit: str = "", interval_s: float = 5.0
) -> tuple[ProgressLines, io.StringIO]:
    stream = io.StringIO()
    display = open_progress(
        description, total, unit=unit, stream=stream, interval_s=interval_s, clock=FakeClock(*readings)
    )
    assert isinstance(display, ProgressLines)
    return display, stream


def test_open_progress_terminal_draws_bar() -> None:
    stream = FakeTerminal()
    with open_progress("training", 5, unit="models", stream=stream) as display:
        assert isinstance(display, ProgressBar)
        for done in range(1, 6):
            display.update_to(done)

    output = stream.getvalue()
    assert "training: 100%|" in output
    assert "5/5" in output
    assert "models/s" in output
    assert "\r" in output, "the bar is redrawn in place"
    assert output.endswith("\n"), "the closed bar stays on its own line"


def test_progress_bar_shows_detail() -> None:
    stream = FakeTerminal()
    with open_progress("replay", 10, unit="records", stream=stream) as display:
        display.update_to(10, "1 rejected")

    assert "1 rejected" in stream.getvalue()


def test_progress_bar_write_above_bar() -> None:
    stream = FakeTerminal()
    with open_progress("training", 2, unit="models", stream=stream) as display:
        display.update_to(1)
        display.write("mutag-wl: 10-fold CV accuracy 0.873")
        display.update_to(2)

    output = stream.getvalue()
    line_at = output.index("mutag-wl: 10-fold CV accuracy 0.873\n")
    assert output.rfind("\r", 0, line_at) == line_at - 1, "the bar is cleared before the line"
    assert "2/2" in output[line_at:], "the bar is drawn again below the line"


def test_progress_bar_counts_initial() -> None:
    stream = FakeTerminal()
    with open_progress("replay", 10, unit="records", stream=stream, initial=4) as display:
        display.update_to(6)

    assert "6/10" in stream.getvalue()


def test_progress_lines_throttled() -> None:
    # Readings: start, then one per update, then close.
    display, stream = plain_lines("replies", 100, [0.0, 1.0, 2.0, 5.0, 7.0, 9.9, 10.0, 11.0, 11.0])
    for done in (10, 20, 30, 40, 50, 60, 70):
        display.update_to(done)
    display.close()

    assert stream.getvalue().splitlines() == [
        "replies 30/100 (30%) after 5.0 s",
        "replies 60/100 (60%) after 10.0 s",
        "replies 70/100 (70%) after 11.0 s",
    ]


def test_progress_lines_final_line_on_close() -> None:
    display, stream = plain_lines("replies", 1038, [0.0, 0.5, 1.0, 1.5])
    display.update_to(3)
    display.update_to(8)
    display.close()

    assert stream.getvalue() == "replies 8/1038 (0%) after 1.5 s\n"


def test_progress_lines_finished_at_once() -> None:
    display, stream = plain_lines("training", 5, [0.0, 0.2, 0.4, 0.6], unit="models")
    display.update_to(4)
    display.update_to(5)
    display.close()
    display.close()

    assert stream.getvalue() == "training 5/5 models (100%) after 0.4 s\n"


def test_progress_lines_skip_unchanged() -> None:
    display, stream = plain_lines("replay", 10, [0.0, 6.0, 12.0, 18.0], unit="records")
    display.update_to(2, "2 completed")
    display.update_to(2, "2 completed")
    display.update_to(2, "2 completed")
    display.close()

    assert stream.getvalue() == "replay 2/10 records (20%) after 6.0 s, 2 completed\n"


def test_progress_lines_write_passes_line() -> None:
    display, stream = plain_lines("training", 5, [0.0, 1.0], unit="models")
    display.write("karate-club: fitted on 17 members")
    display.close()

    assert stream.getvalue().splitlines() == [
        "karate-club: fitted on 17 members",
        "training 0/5 models (0%) after 1.0 s",
    ]


def test_progress_lines_zero_total() -> None:
    display, stream = plain_lines("replay", 0, [0.0, 1.0], unit="records")
    display.close()

    assert stream.getvalue() == "replay 0/0 records (100%) after 1.0 s\n"


def test_progress_lines_plain_text() -> None:
    display, stream = plain_lines("replies", 10, [0.0, *[float(6 * step) for step in range(1, 12)]])
    for done in range(1, 11):
        display.update_to(done)
    display.close()

    assert "\r" not in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


@pytest.fixture
def partly_trained(demo_training: DemoTraining, tmp_path: Path) -> Path:
    """A repository with three demo models published and the two quickest to train missing."""
    repository = tmp_path / "model-repo"
    shutil.copytree(demo_training.repository, repository)
    for name in ("cora-links", "karate-club"):
        shutil.rmtree(repository / name)
    return repository


def train_demo_command(repository: Path) -> tuple[list[str], dict[str, str]]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")}
    environment["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "graphinfer", "models", "train-demo", "--repository", str(repository)]
    return command, environment


def run_in_terminal(command: list[str], environment: dict[str, str], timeout_s: float = 60.0) -> str:
    """Run ``command`` with stdout and stderr on a pseudo-terminal and return its output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=environment, cwd=ROOT
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 65_536)
            except OSError:
                # Linux raises EIO once the child has exited and the terminal is closed.
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    # The terminal turns each "\n" into "\r\n".
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_train_demo_terminal_shows_bar(partly_trained: Path) -> None:
    output = run_in_terminal(*train_demo_command(partly_trained))

    assert re.search(r"training: 100%\|█+\| 5/5 \[", output), output
    assert "karate-club: fitted on 17 members" in output, "step lines are shown"
    assert "karate-club@1 (node): test_accuracy=1.000" in output, "the result lines follow"
    log_lines = [line for line in output.split("\n") if "graphinfer.models.publishing: published" in line]
    assert len(log_lines) == 2
    for line in log_lines:
        # The bar is cleared with "\r" before the log line, so the line itself starts clean.
        assert LOG_LINE_RE.match(line.rsplit("\r", 1)[-1]), repr(line)


def test_train_demo_pipe_prints_plain_lines(partly_trained: Path) -> None:
    command, environment = train_demo_command(partly_trained)
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert result.returncode == 0, result.stderr
    assert re.search(r"^training 5/5 models \(100%\) after [\d.]+ s$", result.stdout, re.MULTILINE)
    assert "karate-club: fitted on 17 members" in result.stdout
    assert "karate-club@1 (node): test_accuracy=1.000" in result.stdout
    assert "\r" not in result.stdout
    assert "|" not in result.stdout, "no bar off a terminal"
