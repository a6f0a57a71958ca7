"""Terminal output: rich for people, one JSON object on stdout for scripts, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .bars import Bar, Cut, FittedProgress
from ..errors import AigcError, Interrupted, Terminated, first_line, one_line
from ..files import json_line


def discard_output(stream=None) -> None:
    """The reader of our stdout (or stderr) has gone (`aigc info x | head -1`): what is still to be
    printed goes nowhere, and the command carries on to its normal end and exit code. A training run
    whose log pipe closed keeps training and saving; rich's default was to exit 1, "a bug" in our table."""
    stream = stream or sys.stdout
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # also what Python flushes at exit: no "Exception ignored" line
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        pass


def stream_failed(stream, error: OSError) -> None:
    """A write to stdout or stderr failed for good: the terminal closed under a run that outlives it
    (EIO), or the log's disk is full (ENOSPC). As for a reader that has gone, the rest of that stream's
    output is dropped and the command carries on to its normal end: a training run keeps training and
    saving (it stopped with exit 2, where the last checkpoint could be many steps old). Said once on
    stderr when it was stdout that failed, naming the stream, since "No space left" reads as if the
    checkpoints' disk were full."""
    global _stdout_lost
    discard_output(stream)
    if stream is sys.stdout and not isinstance(error, BrokenPipeError):
        _stdout_lost = error
        if not _stdout_is_result:  # else check_result_written's error says it, once
            warn(f"stdout: {error.strerror or error}; the rest of its output is dropped")


_stdout_lost: OSError | None = None
_stdout_is_result = False


def stdout_is_result() -> None:
    """Said by commands that end with check_result_written, before they print."""
    global _stdout_is_result
    _stdout_is_result = True


def check_result_written() -> None:
    """For commands whose printed text is their result (`info`, `presets`, `eval`'s scores; they say
    stdout_is_result() first): stdout that could not be written is then an error (exit 2), as --json's
    is; a training run's log is not its result."""
    if _stdout_lost is not None:
        raise OSError(_stdout_lost.errno, _stdout_lost.strerror, "stdout")


def live_display(console: Console) -> bool:
    """Whether a redrawn bar suits this console: a real terminal that can move the cursor. FORCE_COLOR
    with a log file asks for colour, not a bar whose redraws make the log one long line; TERM=dumb
    (Emacs' shell, some IDE consoles) showed no bar until the end, so both get the plain lines."""
    return _isatty(console.file) and console.is_terminal and not console.is_dumb_terminal and not console.quiet


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Console(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True
        discard_output(self.file)

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()
        except OSError as e:  # a reader that has gone is on_broken_pipe; see stream_failed for the rest
            self.quiet = True
            del self._buffer[:]
            stream_failed(self.file, e)


def human_console(json_mode: bool = False, quiet: bool = False) -> Console:
    """With --json, stdout carries only the JSON object, so people's output moves to stderr."""
    # markup=False: paths, class names and metadata are printed as they are ("runs/[old]" is not a style
    # tag, and "[/x]" in a folder name made rich raise MarkupError).
    return _Console(stderr=json_mode, quiet=quiet, soft_wrap=True, highlight=False, markup=False)


def write_out(text: str) -> None:
    """Text as it is on stdout (JSON, a preset's TOML); a closed pipe discards it (see discard_output).
    Any other failure is an error (exit 2): this text is the command's result, and a script reading it
    from a full disk must not take an empty file for success."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        discard_output()
    except OSError as e:
        discard_output()  # also what Python flushes at exit
        raise OSError(e.errno, e.strerror, "stdout") from None


def emit_json(obj: dict) -> None:
    write_out(json_line(obj, sort_keys=True) + "\n")


def _to_stderr(line: str) -> None:
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except OSError:  # `2>&1 | head -1`, a closed terminal, a full disk: the command still finishes its work
        discard_output(sys.stderr)


def warn(message: str) -> None:
    _to_stderr(f"warning: {one_line(message)}\n")


QUIET_HELP = "Print nothing but errors (and --json output)."


def seed_in_range(value: int | None) -> int | None:
    """--seed's check. typer's min/max did it too, but printed `[0<=x<=4294967295]` beside the option,
    a third of the width of every command's help."""
    if value is not None and not 0 <= value <= 2**32 - 1:
        raise typer.BadParameter(f"{value} is not from 0 to 4294967295 (2^32 - 1)")
    return value


def warner(quiet: bool):
    """warn, each message once (`aigc eval` of a VAE reads its data folder twice, for the real statistics
    and the held-out scores, and said each skipped file twice), or with --quiet a function that says nothing."""
    if quiet:
        return lambda message: None
    said: set[str] = set()

    def once(message: str) -> None:
        if message not in said:
            said.add(message)
            warn(message)

    return once


def fail(message: str, code: int, prefix: str = "error") -> None:
    """Errors are one plain line on stderr (no rich wrapping), then the documented exit code. A stop
    asked for by a signal is not an error: its line starts "stopped:"."""
    global _stop_said
    _stop_said = _stop_said or prefix == "stopped"
    _to_stderr(f"{prefix}: {one_line(message)}\n")  # a newline in a path must not make it two
    raise typer.Exit(code)


_stop_said = False


def stop_said() -> bool:
    """Whether a `stopped:` line has been printed (main() prints one for a Ctrl-C no command saw)."""
    return _stop_said


def handles_errors(fn):
    """Map expected failures to their exit codes; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            fail(str(e), e.exit_code, "stopped")
        except AigcError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("SIGINT (Ctrl-C)", 130, "stopped")
        except Terminated as e:
            fail(e.name, e.exit_code, "stopped")
        except OSError as e:  # a path that cannot be read or written: the user's to fix
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}", 2)
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            advice = ("a smaller --batch-size, or less data in memory (data.limit, a smaller model.resolution, or "
                      "data.device_max_mb to stream it)" if fn.__name__ == "train" else "a smaller --batch-size, or fewer images (--n)")
            fail(f"out of memory ({first_line(e)}); use {advice}", 2)

    return wrapper


def sigterm_interrupts(fn):
    """SIGTERM (a batch system's kill, `timeout`) raised as an exception in the main thread, as Ctrl-C
    is: files being written are removed, not left behind under temporary names, and the exit code is
    143. Never raised inside an import (see training.signals.in_import): there it waits for the import to
    end, and a stop still pending when the command ends is raised then. Not for `train`, whose own handler
    saves a checkpoint first (and whose DataLoader workers must not inherit a handler that raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sigterm_raises():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def sigterm_raises():
    """The block of sigterm_interrupts; `train` uses it for its set-up, before its own handler takes over
    (a stop there removes the run folder or lock file it has just made, with a `stopped:` line). A SIGHUP
    (the terminal closed) is taken the same way, with its own exit code, 129."""
    import signal
    import threading

    from ..training.signals import EXIT_CODES, RaiseOutsideImports, stop_signals

    if threading.current_thread() is not threading.main_thread():  # tests calling the command directly
        yield
        return
    came: list[int] = []  # the first stop names the exit code
    stopper = RaiseOutsideImports(lambda: Terminated(signal.Signals(came[0]).name, EXIT_CODES[came[0]]))

    def handle(signum, frame):
        came.append(signum)
        stopper(frame)

    with stopper:
        old = {s: signal.signal(s, handle) for s in stop_signals() if s != signal.SIGINT}
        try:
            yield
        except Exception:
            if stopper.pending:  # a stop waiting for an import, which then failed (perhaps of it): the stop
                raise stopper.make() from None
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if stopper.pending:
            raise stopper.make()


def _out_of_memory(e: BaseException) -> bool:
    """Host or GPU memory exhausted: torch.OutOfMemoryError (a RuntimeError), the CPU allocator's
    RuntimeError, or Python's MemoryError. Told apart without importing torch here."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def duration(seconds: float) -> str:
    """H:MM:SS, with days in front past 24 hours (a long run's ETA must not wrap to a small time)."""
    if not seconds >= 0 or seconds > 1e9:  # NaN, inf, or past ~30 years: not worth a number
        return "?"
    s = round(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def _fmt(record: dict) -> str:
    skip = {"step", "images_seen", "img_per_s", "elapsed_s", "eval"}
    return "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                     if k not in skip and not k.startswith("lr_") and isinstance(v, (int, float)))


class ImageProgress:
    """The progress of `sample` and `eval`: on a terminal a bar per phase (images done of all, images/s,
    time left), gone when the command ends; in logs and batch jobs a plain line every `every` seconds,
    so that only long work says anything. Used as `with progress.listening(ImageProgress(console, "...")):`."""

    EVERY = 30.0  # seconds between plain lines

    def __init__(self, console: Console, label: str, every: float | None = None, clock=time.monotonic):
        self.console, self.every, self.clock = console, self.EVERY if every is None else every, clock
        self.label, self.total, self.done = label, None, 0
        self.bar: FittedProgress | None = None
        if live_display(console):
            self.bar = FittedProgress(SpinnerColumn(), Cut(lambda task: task.description), Bar(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[rate]}", markup=False),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task(label, total=None, rate="")
            self.bar.start()
        self.t0 = self.said = clock()

    def phase(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done, self.t0 = label, total, 0, self.clock()
        if self.bar is not None:
            self.bar.reset(self.task, total=total, description=label, rate="")

    def advance(self, k: int) -> None:
        self.done += k
        now = self.clock()
        rate = self.done / (now - self.t0) if now > self.t0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f} img/s")
        elif not self.console.quiet and now - self.said >= self.every:
            self.said = now
            left = f", eta {duration((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
            of = f"/{self.total:,}" if self.total else ""
            self.console.print(f"{self.label}: {self.done:,}{of} images, {rate:,.0f} img/s{left}")

    def __enter__(self) -> "ImageProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def showing_progress(console: Console, label: str):
    """Around a command's long image work: progress.phase/advance calls inside are shown (ImageProgress)."""
    from .. import progress

    with ImageProgress(console, label) as shown, progress.listening(shown):
        yield shown


class ConsoleReporter:
    """Progress bar on a terminal; plain periodic lines in logs, batch jobs and CI."""

    def __init__(self, console: Console):
        self.console = console
        self.err = _Console(stderr=True, quiet=console.quiet, soft_wrap=True, highlight=False, markup=False)  # warnings
        self.progress: FittedProgress | None = None
        self.err_above_bar = False
        self.total = 0
        self.t0 = time.perf_counter()

    def start(self, total_steps: int, info: dict) -> None:
        self.total, self.t0 = total_steps, time.perf_counter()
        self.first = info.get("start_step", 0)  # a resumed run's ETA counts only the steps taken in this process
        self.mark: tuple[float, int] | None = None  # (time, step) of the first line: the rate from there on
        self.console.print(f"training {info['model']} on {info['data']} -> {info['run_dir']}  "
                           f"({info['steps']} step{'s' * (info['steps'] != 1)}, batch {info['batch_size']}, {info['device']}, {info['precision']})")
        if live_display(self.console):
            # With stderr on the terminal too, stderr is printed above the live bar (rich's redirect);
            # with stderr sent elsewhere (`2>log`), it must stay stderr, not be drawn on stdout.
            self.err_above_bar = _isatty(self.err.file)  # FORCE_COLOR with `2>log` made notes miss the log
            self.progress = FittedProgress(TextColumn("[bold]train"), Bar(), MofNCompleteColumn(),
                                           Cut(lambda task: task.fields.get("stats", ""), sep="  "),
                                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                           console=self.console, transient=False, redirect_stderr=self.err_above_bar)
            self.task = self.progress.add_task("train", total=total_steps, completed=self.first, stats="")
            self.progress.start()

    def advance(self, step: int) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step)

    def log(self, record: dict) -> None:
        if record.get("eval"):  # an evaluation during training: its own line, also under a progress bar
            (self.progress.console if self.progress else self.console).print(
                f"eval at step {record['step']}/{self.total}  {_fmt(record)}")
            return
        stats = f"{record['img_per_s']:.0f} img/s  {_fmt(record)}"
        if self.progress:
            self.progress.update(self.task, stats=stats)
            return
        # From the first line on, the rate since that line: the first interval holds the one-off start-up
        # (compiling, cuDNN's search, warm-up), which made a short run's ETA many times what was left.
        # Later intervals hold the run's recurring evaluations and saves, as the steps to come will.
        step, now = record["step"], time.perf_counter()
        since, first = self.mark or (self.t0, self.first)
        if self.mark is None:
            self.mark = (now, step)
        eta = (now - since) / (step - first) * (self.total - step) if step > first else float("inf")
        self.console.print(f"step {step}/{self.total}  {stats}  eta {duration(eta)}")

    def note(self, text: str) -> None:
        """Warnings and events (resume, rollback, SIGUSR1 save) go to stderr, above a live progress bar
        when both are on the terminal."""
        if self.progress and self.err_above_bar:
            self.progress.console.print(f"note: {text}")
        else:
            self.err.print(f"note: {text}")

    def finish(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
