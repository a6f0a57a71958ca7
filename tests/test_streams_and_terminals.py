"""Where output goes in real use, on the real command: a log whose disk fills up, a terminal that closes
(SIGHUP) or goes away under a run, an encoding that cannot hold a path, TERM=dumb and FORCE_COLOR,
odd COLUMNS, and a current folder deleted under the shell."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from aigc_cli import checkpoint as ckpt_io
from conftest import aigc_command

TINY = ["--preset", "quickstart", "--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "data.limit=64",
        "--set", "train.log_every=1"]


def run(aigc_env, args, timeout=300, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(aigc_command() + [str(a) for a in args], env=kw.pop("env", aigc_env), text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def trained(aigc_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("streams") / "run"
    run(aigc_env, ["train", *TINY, "--steps", "1", "--out", out], check=True)
    return out


def test_a_full_log_disk_drops_stdout_and_training_goes_on_to_its_end(aigc_env, tmp_path):
    """`aigc train > /full/disk/log`: the run stopped with exit 2 at the first line that did not fit,
    its last checkpoint possibly many steps old, and "No space left" did not say which file."""
    with open("/dev/full", "w") as full:
        proc = run(aigc_env, ["train", *TINY, "--steps", "4", "--out", tmp_path / "run"], stdout=full)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "warning: stdout: No space left on device; the rest of its output is dropped\n"
    assert ckpt_io.load(tmp_path / "run").step == 4


@pytest.mark.parametrize("args", [["info", "{run}", "--json"], ["info", "{run}"], ["presets", "list"]])
def test_a_result_that_cannot_be_written_is_an_error_not_an_empty_success(aigc_env, trained, args):
    with open("/dev/full", "w") as full:
        proc = run(aigc_env, [a.format(run=trained) for a in args], stdout=full)
    assert proc.returncode == 2 and proc.stderr == "error: stdout: No space left on device\n", proc.stderr  # one line


def test_a_stop_keeps_its_exit_code_when_its_json_summary_cannot_be_written(aigc_env, tmp_path):
    """A requeue script reads 143; an unwritable --json summary turned it into 2 ("bad input")."""
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(aigc_command() + ["train", *TINY, "--steps", "100000", "--out", str(out), "--json"],
                                env=aigc_env, stdout=full, stderr=subprocess.PIPE, text=True)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.exists() or not metrics.read_text().strip()):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "the --json summary of the stop is lost" in err, err
    assert err.splitlines()[-1].startswith("stopped: SIGTERM at step")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--bogus"]])
def test_help_and_usage_errors_on_full_streams_are_exit_2_without_a_traceback(aigc_env, args):
    with open("/dev/full", "w") as full:
        out_full = run(aigc_env, args, stdout=full)
        both_full = run(aigc_env, args, stdout=full, stderr=full)
    assert out_full.returncode == 2 and "Traceback" not in out_full.stderr
    assert out_full.stderr.startswith("error: ") and out_full.stderr.count("\n") == 1, out_full.stderr
    assert both_full.returncode == 2  # nothing could be said; still not exit 1 ("a bug")


def test_warnings_on_a_full_stderr_do_not_cost_the_json_result(aigc_env, trained, tmp_path):
    """`aigc ... --json 2>/full/disk/err`: the first warning ended the command with exit 1 and no JSON."""
    import json

    each = tmp_path / "each"
    each.mkdir()
    (each / "old.png").write_bytes(b"")  # sample warns of PNGs it did not write
    with open("/dev/full", "w") as full:
        proc = run(aigc_env, ["sample", trained, "--n", "3", "--individual", each, "--json"], stderr=full)
    assert proc.returncode == 0 and json.loads(proc.stdout)["individual"] == str(each), proc.stdout
    assert sorted(os.listdir(each)) == ["000000.png", "000001.png", "000002.png", "old.png"]


def test_an_ascii_only_stdout_prints_escapes_for_a_non_ascii_run_folder(aigc_env, trained, tmp_path):
    """PYTHONIOENCODING=ascii or a latin-1 locale: a run that trained to its end crashed printing its
    checkpoint's path (exit 1); so did `info` and `eval`."""
    import shutil

    out = tmp_path / "run-é日本"
    shutil.copytree(trained, out)
    proc = run({**aigc_env, "PYTHONIOENCODING": "ascii"}, ["info", out])
    assert proc.returncode == 0 and "run-\\xe9\\u65e5\\u672c" in proc.stdout, proc.stderr
    info = run({**aigc_env, "PYTHONIOENCODING": "latin-1"}, ["info", out], encoding="latin-1")
    assert info.returncode == 0 and "run-é\\u65e5\\u672c" in info.stdout, info.stderr


@pytest.mark.parametrize("columns", ["0", "100000"])
def test_an_unusable_columns_value_is_ignored(aigc_env, columns):
    """COLUMNS=0 laid every table and line out 0 wide: the commands printed nothing and exited 0."""
    proc = run({**aigc_env, "COLUMNS": columns}, ["presets", "list"])
    assert proc.returncode == 0 and "quickstart" in proc.stdout and len(proc.stdout) < 20_000


def test_a_deleted_current_folder_is_one_line(aigc_env, tmp_path):
    """Torch's import died there with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.Popen(["bash", "-c", f"cd '{gone}' && rmdir '{gone}' && exec \"$@\"", "bash", *aigc_command(),
                             "presets", "list"], env=aigc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out) == (2, "") and err.startswith("error: the current folder no longer exists"), err
    assert err.count("\n") == 1


def _on_a_pty(aigc_env, args, **env) -> tuple[int, str]:
    """Run the command with stdout and stderr on a pseudo-terminal; what the terminal showed."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(aigc_command() + [str(a) for a in args], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env={**aigc_env, **env})
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the command has ended and closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=120), shown.decode(errors="replace")


def test_a_dumb_terminal_and_forced_colour_in_a_log_get_plain_step_lines(aigc_env, tmp_path):
    """TERM=dumb (Emacs' shell) showed no progress until the end; FORCE_COLOR=1 with a log file made the
    log one long line of redraws with no `step` line in it."""
    code, shown = _on_a_pty(aigc_env, ["train", *TINY, "--steps", "3", "--out", tmp_path / "a"], TERM="dumb")
    assert code == 0 and all(f"step {k}/3" in shown for k in (1, 2, 3)), shown
    assert "\r" not in shown.replace("\r\n", "\n")
    with open(tmp_path / "log", "w") as log:
        proc = run({**aigc_env, "FORCE_COLOR": "1"}, ["train", *TINY, "--steps", "3", "--out", tmp_path / "b"],
                   stdout=log)
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 0 and "\r" not in text and all(f"step {k}/3" in text for k in (1, 2, 3)), text


def test_a_real_terminal_still_gets_the_bar(aigc_env, tmp_path):
    code, shown = _on_a_pty(aigc_env, ["train", *TINY, "--steps", "3", "--out", tmp_path / "a"], TERM="xterm")
    assert code == 0 and "━" in shown and "step 1/3" not in shown, shown


def test_a_terminal_that_goes_away_under_a_finished_run_does_not_fail_it(aigc_env, tmp_path):
    """A run that ignores SIGHUP (disowned) and whose terminal closed: the end of training printed to a
    terminal that was gone (EIO), and a complete run exited 1, so `make`'s next step never ran."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(aigc_command() + ["train", *TINY, "--steps", "40", "--out", str(tmp_path / "r"),
                                              "--set", "train.ckpt_every=100000"],
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env={**aigc_env, "TERM": "dumb"},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    os.close(slave)
    seen = b""
    while b"step 2/40" not in seen:
        seen += os.read(master, 65536)
    os.close(master)  # the terminal is gone: every later write fails with EIO
    assert proc.wait(timeout=300) == 0
    assert ckpt_io.load(tmp_path / "r").step == 40


def test_sighup_under_nohup_is_left_ignored(aigc_env, tmp_path):
    """`nohup aigc train ...`: the run must outlive the terminal, so a SIGHUP that was ignored stays so."""
    out = tmp_path / "run"
    proc = subprocess.Popen(aigc_command() + ["train", *TINY, "--steps", "100000", "--out", str(out)],
                            env=aigc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)
    seen = len(metrics.read_text().splitlines())
    while time.time() < deadline and len(metrics.read_text().splitlines()) < seen + 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped: SIGTERM at step" in err, err
