"""Shared fixtures: the real `aigc` command in a subprocess, and small generated data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from aigc_cli.config import Config, config_from_dict


def aigc_command() -> list[str]:
    exe = Path(sys.executable).with_name("aigc")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("aigc")
    return [found] if found else [sys.executable, "-m", "aigc_cli"]


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


def pytest_configure(config):
    """One compute thread per test process. `make test` runs one pytest worker per core (pytest-xdist),
    and torch's default of a thread per core in each would oversubscribe them; the tests' tiny models
    gain nothing from a second thread anyway. OMP_NUM_THREADS reaches the `aigc` subprocesses."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def aigc_env(tmp_path_factory) -> dict:
    """Environment for subprocess runs: no GPU, no colour, datasets looked up in an empty folder.
    HOME_FOR_TESTS, unique to this test process, also marks its children (see no_leftover_commands)."""
    home = tmp_path_factory.mktemp("home")
    # The `aigc` subprocesses import the tree these tests are in, as the in-process tests do, not the one the
    # venv's editable install points at (a copy of the repository tested with another checkout's venv).
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "AIGC_DATA_ROOT": str(home / "datasets"), "AIGC_CACHE_DIR": str(home / "cache"),
            "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1", "COLUMNS": "200", "HOME_FOR_TESTS": str(home),
            "PYTHONPATH": path}


def _processes_with(marker: bytes) -> dict[int, str]:
    """pid -> command line of each live process whose environment holds `marker` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/environ").exists() else ():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile, or not ours
                continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_commands(aigc_env):
    """A test that fails or times out while its `aigc` child runs must not leave that child training on
    the cores under every later test: one did, for 7 minutes of a CI run. Its children (and theirs,
    even once orphaned) carry this process's HOME_FOR_TESTS; any still running are killed, and the test
    that left them errors. Those that end within a few seconds are let be: a killed command's DataLoader
    workers notice it is gone on their own."""
    yield
    marker = f"HOME_FOR_TESTS={aigc_env['HOME_FOR_TESTS']}".encode()
    deadline = time.monotonic() + 8
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left commands running (now killed): {sorted(left.values())}"


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every in-process test gets its own empty cache folder: tests never write into the real
    ~/.cache/aigc, and one test's decoded-image cache cannot satisfy another test's load."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AIGC_CACHE_DIR", str(path))
    monkeypatch.delenv("AIGC_CACHE_MAX_GB", raising=False)
    return path


@pytest.fixture(scope="session")
def aigc(aigc_env):
    """Run `aigc ARGS...` for real; returns exit code, stdout and stderr."""

    def run(*args, cwd=None, timeout=300) -> Result:
        proc = subprocess.run(aigc_command() + [str(a) for a in args], capture_output=True, text=True,
                              env=aigc_env, cwd=cwd or aigc_env["HOME_FOR_TESTS"], timeout=timeout,
                              stdin=subprocess.DEVNULL)
        return Result(proc)

    return run


@pytest.fixture
def cli(monkeypatch, capsys, aigc_env):
    """`aigc ARGS` in this process, with the same Result as `aigc`: about 0.3 s a call instead of 3 s of
    interpreter and torch start-up. For the many checks of messages and outputs; `aigc` keeps real runs."""
    for key in ("AIGC_DATA_ROOT", "NO_COLOR", "COLUMNS"):
        monkeypatch.setenv(key, aigc_env[key])
    monkeypatch.chdir(aigc_env["HOME_FOR_TESTS"])

    def run(*args) -> Result:
        code, out, err = run_cli(monkeypatch, capsys, *args)
        return Result(subprocess.CompletedProcess(args, code, out, err))

    return run


def write_image_folder(root: Path, n_per_class: int = 6, size: int = 24, classes=("cats", "dogs")) -> Path:
    """Real PNG and JPEG files in class subfolders: RGB, grayscale and odd sizes."""
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            colour = (40 + 80 * c, 30 * i % 255, 200 - 20 * i)
            img = Image.new("RGB", (size + 3 * i, size), colour)
            for x in range(0, img.width, 4):
                img.putpixel((x, (x + i) % size), (255, 255, 255))
            if i % 3 == 0:
                img.convert("L").save(d / f"img{i}.png")
            elif i % 3 == 1:
                img.save(d / f"img{i}.jpg", quality=90)
            else:
                img.save(d / f"img{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "my images")


def default_sighup() -> None:
    """preexec_fn for a child that is to get SIGHUP: one ignored where the tests run (nohup) is inherited."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class TerminalBuffer(io.StringIO):
    """A StringIO that says it is a terminal: the live bar is drawn only on a real terminal."""

    def isatty(self) -> bool:
        return True


def terminal_console(buf: io.StringIO, width: int = 120, **kw):
    """A console on a pretend terminal (TerminalBuffer), whatever TERM the tests run under."""
    from rich.console import Console

    return Console(file=buf, force_terminal=True, width=width, _environ={"TERM": "xterm"}, **kw)


class Silent:
    """A training reporter that records what it is told instead of printing it."""

    def __init__(self):
        self.notes, self.records = [], []

    def start(self, total_steps, info): self.info = info
    def advance(self, step): pass
    def log(self, record): self.records.append(record)
    def note(self, text): self.notes.append(text)
    def finish(self): pass


class StopsAt(Silent):
    """Sends this process SIGTERM during step k, as a batch scheduler would."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def advance(self, step):
        if step == self.k:
            os.kill(os.getpid(), signal.SIGTERM)


class Timed(Silent):
    """A reporter whose every step takes `minutes` on train.ckpt_minutes' clock, once `.on(monkeypatch)`."""

    def __init__(self, minutes: float):
        super().__init__()
        self.minutes, self.steps_done = minutes, 0

    def advance(self, step):
        self.steps_done += 1  # steps run, not the step number: a rollback does not turn the clock back

    def on(self, monkeypatch) -> "Timed":
        from aigc_cli.training import loop

        monkeypatch.setattr(loop, "clock", lambda: self.steps_done * self.minutes * 60)
        return self


def tiny(kind: str, **model) -> Config:
    return config_from_dict({
        "name": f"test-{kind}",
        "model": {"kind": kind, "resolution": 16, "channels": 1, "latent_dim": 8, "g_width": 8, "d_width": 8,
                  "hidden": 32, **model},
        "data": {"source": "shapes", "limit": 512},
        "train": {"steps": 20, "batch_size": 16, "log_every": 5, "sample_every": 20, "ckpt_every": 20,
                  "n_samples": 4, "lr_g": 1e-3 if kind in ("vae", "classifier") else 2e-4},
    })


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


class Counting:
    """Wraps an extractor and counts the images it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0
        self.name, self.protocol = inner.name, inner.protocol

    def embed(self, images, batch_size, on_device=False):
        self.images += len(images)
        return self.inner.embed(images, batch_size, on_device=on_device)


@pytest.fixture
def simulated_capture(monkeypatch):
    """CUDA streams and graphs stood in for on the CPU: GraphedStep's warm-up and capture run their
    Python as on a GPU (the "capture" runs the step once, replays do nothing). Set `.capture = True`
    on the GraphedStep to take that path."""
    import aigc_cli.training.graph as graph_mod

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    cuda = graph_mod.torch.cuda
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(cuda, "graph", lambda g: contextlib.nullcontext())


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`aigc ARGS` in this process, through the same main() as the console script (fast: no subprocess)."""
    from aigc_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["aigc", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def module_that_stops_its_import(tmp_path, monkeypatch, name: str, tail: str = "") -> None:
    """A module `name` (importable from now on) whose import sends this process SIGTERM and swallows whatever
    is raised in it, as C code calling an import (torch's `import numpy`) does."""
    (tmp_path / f"{name}.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.3)\n"
        "except BaseException:\n"
        "    pass\n" + tail)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 2-step tiny DCGAN runs to sample from, an unconditional ("gan") and a conditional ("cond") one, made
    once per test module."""
    from aigc_cli.training.loop import train

    root = tmp_path_factory.mktemp("sample-runs")
    out = {}
    for name, model in (("gan", {}), ("cond", {"conditional": True})):
        cfg = tiny("dcgan", **model).with_overrides({"train.steps": 2, "train.ckpt_every": 2, "train.sample_every": 2})
        train(cfg, root / name, Silent())
        out[name] = root / name
    return out
