"""Plain progress lines (logs, batch jobs): the ETA of long and resumed runs; where notes go under a
live progress bar; closed pipes, interrupts while options are parsed, and arguments the shell left as
typed."""
import io
import re

import pytest
from rich.console import Console

from aigc_cli.cli import output
from aigc_cli.cli.output import ConsoleReporter, duration


def test_duration_shows_days_instead_of_wrapping_at_24_hours():
    assert duration(0) == "0:00:00"
    assert duration(3725.4) == "1:02:05"
    assert duration(86400 * 3 + 3600 * 5 + 7) == "3d 5:00:07"
    assert duration(float("inf")) == "?" and duration(float("nan")) == "?" and duration(1e300) == "?"


def _lines(monkeypatch, start_step, total, steps_and_times):
    now = [0.0]
    monkeypatch.setattr(output.time, "perf_counter", lambda: now[0])
    buf = io.StringIO()
    rep = ConsoleReporter(Console(file=buf, force_terminal=False, width=200))
    rep.start(total, {"model": "dcgan", "data": "d", "run_dir": "r", "steps": total, "batch_size": 64,
                      "device": "cpu", "precision": "fp32", "start_step": start_step})
    for step, t in steps_and_times:
        now[0] = t
        rep.log({"step": step, "img_per_s": 100.0, "loss_d": 1.0})
    return buf.getvalue().splitlines()[1:]


def test_eta_of_a_long_run_counts_days(monkeypatch):
    # 100 steps in 100 s, 1,000,000 steps to go: 10^6 s = 11 days 13:46:40, not 13:46:40.
    [line] = _lines(monkeypatch, 0, 1_000_100, [(100, 100.0)])
    assert line.endswith("eta 11d 13:46:40"), line


def test_eta_after_a_resume_counts_only_this_processes_steps(monkeypatch):
    # Resumed at step 5000 of 10000; 10 steps took 10 s, so 4990 s remain (not 4990/5010 of 10 s).
    [line] = _lines(monkeypatch, 5000, 10_000, [(5010, 10.0)])
    assert line.endswith("eta 1:23:10"), line


def test_eta_leaves_out_the_start_up_of_the_first_interval(monkeypatch):
    """40 s of compiling in the first 100 steps, then 1 s a step: the second line said 0:16:00 (240 s over
    200 steps, times 800 left) for the 800 s left. From the first line on, the rate since that line."""
    lines = _lines(monkeypatch, 0, 1000, [(100, 140.0), (200, 240.0)])
    assert lines[0].endswith("eta 0:21:00") and lines[1].endswith("eta 0:13:20"), lines


def _bar_and_note(err_on_terminal: bool) -> tuple[str, Console]:
    """A live bar on a (pretend) terminal stdout; one note printed while it runs."""
    from conftest import TerminalBuffer, terminal_console

    out = TerminalBuffer()
    rep = ConsoleReporter(terminal_console(out))
    err = TerminalBuffer() if err_on_terminal else io.StringIO()
    # force_terminal either way, as FORCE_COLOR=1 gives: `2>log` with it drew the notes on the terminal instead
    rep.err = Console(file=err, force_terminal=True, soft_wrap=True, highlight=False, markup=False)
    rep.start(10, {"model": "dcgan", "data": "d", "run_dir": "r", "steps": 10, "batch_size": 64,
                   "device": "cpu", "precision": "fp32"})
    assert rep.progress is not None
    rep.note("skipping 0008.png: truncated")
    rep.finish()
    return out.getvalue(), err.getvalue()


def test_notes_under_a_live_bar_stay_on_stderr_when_stderr_is_not_the_terminal():
    out, err = _bar_and_note(err_on_terminal=False)  # `aigc train ... 2>log` on a terminal
    assert err == "note: skipping 0008.png: truncated\n"
    assert "skipping" not in out and "train" in out  # the bar itself stays on stdout


def test_notes_under_a_live_bar_print_above_it_when_both_are_the_terminal():
    out, err = _bar_and_note(err_on_terminal=True)
    assert "note: skipping 0008.png: truncated" in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out) and err == ""


def _live_train_line(width: int) -> str:
    """The training bar's line on a pretend terminal `width` columns wide, with a full set of losses."""
    from conftest import TerminalBuffer, terminal_console

    out = TerminalBuffer()
    rep = ConsoleReporter(terminal_console(out, width=width))
    rep.start(5000, {"model": "dcgan", "data": "d", "run_dir": "r", "steps": 5000, "batch_size": 64,
                     "device": "cpu", "precision": "fp32"})
    rep.advance(1234)
    rep.log({"step": 1234, "img_per_s": 1532.4, "loss_d": 1.2345, "loss_g": 0.98765, "d_real": 0.61, "d_fake": 0.33})
    rep.finish()
    lines = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue()).replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip()][-1]


@pytest.mark.parametrize("width", [50, 60, 80, 100])
def test_a_narrow_terminal_keeps_the_step_count_and_time_left_and_cuts_the_losses(width):
    """At 80 columns the losses took the step count's and the ETA's room: "train   1532 img/s  loss_d ... eta …"."""
    line = _live_train_line(width)
    assert len(line.rstrip()) <= width and "1234/5000" in line and re.search(r"eta \S:\S\S:\S\S$", line.rstrip()), line
    assert "1532 img/s" in line and "…" in line and "d_fake" not in line, line  # cut at the end
    if width >= 80:  # between two values, not inside one ("loss_d 1.2…" reads as a value)
        assert re.search(r"\d  … ", line), line


def test_a_wide_terminal_shows_the_bar_and_every_loss():
    line = _live_train_line(160)
    assert "━" * 20 in line and "loss_g 0.9877  d_real 0.61  d_fake 0.33 " in line and "…" not in line, line


def test_a_closed_stdout_discards_output_and_the_command_finishes(aigc_env, tmp_path):
    """`aigc ... | head -1`: the reader has gone before anything is written. Rich exited 1 ("a bug"),
    print() gave "error: Broken pipe" (exit 2), and a training run died unsaved."""
    import os
    import subprocess

    from conftest import aigc_command

    tiny = ["--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "data.limit=64", "--set", "train.log_every=1"]
    for args in (["presets", "show", "quickstart"], ["presets", "list"],
                 ["train", "--preset", "quickstart", "--steps", "3", "--out", str(tmp_path / "run"), *tiny],
                 ["info", str(tmp_path / "run"), "--json"]):
        r, w = os.pipe()
        os.close(r)  # every write to stdout fails with EPIPE
        try:
            proc = subprocess.run(aigc_command() + args, stdout=w, stderr=subprocess.PIPE, text=True, env=aigc_env,
                                  timeout=300)
        finally:
            os.close(w)
        assert proc.returncode == 0 and "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003.safetensors").is_file()



def test_a_closed_file_descriptor_1_or_2_is_no_crash(aigc_env, tmp_path):
    """`aigc ... >&-` (cron, daemons): Python set sys.stdout to None and every command died on it, exit 1;
    and the next file opened would have taken descriptor 1, where prints would then go."""
    import subprocess

    from conftest import aigc_command

    cmd = " ".join(f"'{a}'" for a in aigc_command())
    train = (f"{cmd} train --preset quickstart --steps 2 --out '{tmp_path / 'run'}' --set model.g_width=8 "
             "--set model.d_width=8 --set data.limit=64 --set train.log_every=1")
    for closing in (">&-", "2>&-", ">&- 2>&-"):
        proc = subprocess.run(["bash", "-c", f"{train} --resume auto --steps {2 + len(closing)} {closing}"],
                              capture_output=True, text=True, env=aigc_env, timeout=300)
        assert proc.returncode == 0, (closing, proc.stderr)
    proc = subprocess.run(["bash", "-c", f"{cmd} sample '{tmp_path / 'run'}' --n 4 --out '{tmp_path / 'g.png'}' >&-"],
                          capture_output=True, text=True, env=aigc_env, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "g.png").is_file(), proc.stderr
    from aigc_cli import checkpoint as ckpt_io

    assert ckpt_io.load(tmp_path / "run").step == 2 + len(">&- 2>&-")  # every checkpoint whole

@pytest.mark.parametrize("raised, code, err", [
    (KeyboardInterrupt, 130, "stopped: SIGINT (Ctrl-C)\n"),  # typer returned 130 and printed nothing
    (EOFError, 2, "error: unexpected end of input\n"),  # was reported as a Ctrl-C
])
def test_an_interrupt_while_options_are_parsed(monkeypatch, capsys, raised, code, err):
    import typer.core

    from conftest import run_cli

    def parse_args(self, ctx, args):
        raise raised

    monkeypatch.setattr(typer.core.TyperCommand, "parse_args", parse_args)
    got_code, out, got_err = run_cli(monkeypatch, capsys, "presets", "list")
    assert (got_code, out) == (code, "") and got_err.strip() == err.strip(), got_err


def test_tilde_is_expanded_for_paths_only(monkeypatch):
    from aigc_cli.cli import tidy_args

    monkeypatch.setenv("HOME", "/home/u")
    assert tidy_args(["sample", "~/run", "--out=~/g.png", "--class", "~", "--class=~root", "--set", "name=~x"]) == \
        ["sample", "/home/u/run", "--out=/home/u/g.png", "--class", "~", "--class=~root", "--set", "name=~x"]


def test_a_closed_stderr_does_not_turn_warnings_or_errors_into_a_crash(monkeypatch):
    import typer

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise ValueError("not a real file")

    monkeypatch.setattr(output.sys, "stderr", Closed())
    output.warn("a warning nobody reads")  # used to raise, and end the command with exit 1 ("a bug")
    with pytest.raises(typer.Exit) as e:
        output.fail("bad input", 2)
    assert e.value.exit_code == 2
