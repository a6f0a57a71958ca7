"""Progress of `aigc sample` and `aigc eval`: the library names its phases and counts images; the command
line shows a bar on a terminal and a plain line now and then in logs; nobody listening costs nothing."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from aigc_cli import checkpoint as ckpt_io
from aigc_cli import progress
from aigc_cli.cli import output
from aigc_cli.cli.output import ImageProgress
from aigc_cli.metrics import evaluate as evaluate_mod
from aigc_cli.training.loop import train
from conftest import Silent, run_cli, tiny


class Recorder:
    def __init__(self):
        self.events = []

    def phase(self, label, total):
        self.events.append([label, total, 0])

    def advance(self, k):
        self.events[-1][2] += k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    train(tiny("classifier", channels=3).with_overrides({"train.steps": "3"}), root / "clf", Silent())
    train(tiny("dcgan").with_overrides({"train.steps": "1"}), root / "gan", Silent())
    return root


def test_evaluation_names_each_phase_and_counts_every_image(runs, tmp_path):
    args = dict(data="shapes", root=None, download=False, features=str(runs / "clf"), n=50, batch_size=16,
                seed=0, device="cpu", precision="fp32", warn=print, stats_dir=tmp_path)
    with progress.listening(Recorder()) as heard:
        evaluate_mod.evaluate(ckpt_io.load(runs / "gan"), metrics=["fid"], **args)
    assert heard.events == [["loading the real data (shapes)", None, 0], ["embedding real images", 50, 50],
                            ["generating and embedding", 50, 50]]
    with progress.listening(Recorder()) as again:  # the statistics are cached now: no real images embedded
        evaluate_mod.evaluate(ckpt_io.load(runs / "gan"), metrics=["fid"], **args)
    assert again.events == [["loading the real data (shapes)", None, 0], ["generating and embedding", 50, 50]]
    evaluate_mod.evaluate(ckpt_io.load(runs / "gan"), metrics=["fid"], **args)  # nobody listening: no error


def test_plain_lines_come_only_every_so_often_with_rate_and_eta():
    now = [100.0]
    buf = io.StringIO()
    shown = ImageProgress(Console(file=buf, force_terminal=False, width=200), "starting", every=30, clock=lambda: now[0])
    with shown:
        shown.phase("generating", 1000)
        for t in (5, 20, 35, 50, 70):
            now[0] = 100 + t
            shown.advance(100)
    lines = buf.getvalue().splitlines()
    # 200 images in 35 s at t=35 (30 s after the start), then nothing until 30 s after that line
    assert lines == ["generating: 300/1,000 images, 9 img/s, eta 0:01:22", "generating: 500/1,000 images, 7 img/s, eta 0:01:10"]
    quiet = io.StringIO()
    silent = ImageProgress(Console(file=quiet, quiet=True), "x", every=0, clock=lambda: now[0])
    silent.phase("generating", None)
    silent.advance(5)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_bar_that_goes_when_the_command_ends():
    from conftest import TerminalBuffer, terminal_console

    buf = TerminalBuffer()
    with ImageProgress(terminal_console(buf), "loading") as shown:
        shown.phase("generating", 64)
        shown.advance(64)
    text = buf.getvalue()
    assert "generating" in text and "64/64" in text and "img/s" in text


@pytest.mark.parametrize("width", [60, 80])
def test_a_narrow_terminal_keeps_the_counts_whole_and_shortens_the_bar(width):
    """rich's bar kept its 40 columns and cut the counts and times to "12…" and "0:…" at 80 columns."""
    import re

    from conftest import TerminalBuffer, terminal_console

    def last_line():
        shown.bar.refresh()
        text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue()).replace("\r", "\n")
        return [line for line in text.splitlines() if "sampling" in line][-1].rstrip()

    buf = TerminalBuffer()
    with ImageProgress(terminal_console(buf, width=width), "sampling") as shown:
        shown.phase("sampling", None)  # no total yet: no time left, whose empty column still takes a cell
        shown.advance(12345)
        line = last_line()
        assert len(line) <= width and "12345/?" in line and "0:00:00" in line and "…" not in line, line
        shown.phase("sampling", 50000)
        shown.advance(12345)
        line = last_line()
        assert len(line) <= width and "12345/50000" in line and "img/s 0:00:00 -:--:--" in line and "…" not in line, line
        long = "sampling the images in /data/" + "a_rather_long_folder_name/" * 4  # eval's labels hold paths
        shown.phase(long, 50000)
        shown.advance(2048)
        shown.bar.refresh()
        text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue()).replace("\r", "\n")
        line = [line for line in text.splitlines() if "2048/50000" in line][-1].rstrip()
    # the label is cut, not the count and times ("204…" read as a count of 204)
    assert len(line) <= width and "sampling th" in line and "…" in line, line
    assert line.endswith(" img/s 0:00:00 -:--:--"), line


def test_sample_prints_progress_lines_in_a_log(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(output.ImageProgress, "EVERY", 0.0)  # a line per batch
    code, out, err = run_cli(monkeypatch, capsys, "sample", runs / "gan", "--n", 40, "-b", 16, "--out", tmp_path / "g.png")
    assert code == 0, err
    assert [line.split(",")[0] for line in out.splitlines()] == [
        "generating: 16/40 images", "generating: 32/40 images", "generating: 40/40 images", f"wrote 40 images: {tmp_path / 'g.png'}"]
