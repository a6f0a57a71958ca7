"""The CUDA-graph step's bookkeeping on the CPU (a counting stand-in for torch.cuda.CUDAGraph): when `use_graph`
captures and what it says, that the capture step and every later one replay the graph, its own input buffers,
a reset's warm-up and re-capture, autocast's cache around warm-up, capture and a failed capture."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.training.graph import WARMUP, GraphedStep, use_graph
from aigc_cli.training.precision import Precision
from aigc_cli.training.steps import Aids

from conftest import tiny

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: no GPU needed


def test_cuda_graph_off_is_off_even_where_the_step_could_be_captured():
    notes = []
    cfg = tiny("dcgan").with_overrides({"train.cuda_graph": "off"})
    assert use_graph(cfg, Precision("fp32", CPU), CUDA, False, notes.append) is False and notes == []
    assert use_graph(tiny("dcgan"), Precision("fp32", CPU), CUDA, False, notes.append) is True and notes == []


def test_auto_says_why_on_cuda_and_nothing_on_the_cpu():
    """auto on a GPU that cannot capture this run's step says why (the user expected the fast path there);
    on the CPU, where no step is ever captured, it says nothing in every run."""
    notes = []
    cfg = tiny("dcgan")
    assert cfg.train.cuda_graph == "auto"
    assert use_graph(cfg, Precision("fp32", CPU), CUDA, True, notes.append) is False
    assert len(notes) == 1 and "CUDA graph off" in notes[0] and "schedule" in notes[0]
    notes.clear()
    assert use_graph(cfg, Precision("fp32", CPU), CPU, False, notes.append) is False and notes == []


class _Replays:
    """A stand-in CUDAGraph that counts its replays and how many were made."""

    made = 0

    def __init__(self):
        type(self).made += 1
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def counted_graphs(simulated_capture, monkeypatch):
    import aigc_cli.training.graph as graph_mod

    class Graph(_Replays):
        made = 0

    monkeypatch.setattr(graph_mod.torch.cuda, "CUDAGraph", Graph)
    return Graph


def _graphed(seen=None):
    amp = Precision("bf16", CPU)

    def step_fn(nets, opts, amp_, next_batch, cfg, step, aids):
        if seen is not None:
            seen.append(amp_.graph_safe)
        x, _ = next_batch()
        return {"loss": x.sum()}

    graphed = GraphedStep(step_fn, {}, {}, amp, tiny("dcgan"), Aids())
    graphed.capture = True  # pretend CUDA is here
    return graphed, amp


def test_the_capture_step_and_every_later_step_replay_the_graph(counted_graphs):
    """A capture records without running: the step being captured must be replayed too, and so must each
    later one (on the CPU the simulated capture runs the Python, so only the replay count tells)."""
    graphed, amp = _graphed()
    batch = (torch.zeros(2, 1, 4, 4), None)
    for step in range(1, WARMUP + 4):
        graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
    assert counted_graphs.made == 1 and graphed.graph.replays == 3  # the capture's step and two more


def test_the_captured_step_keeps_its_own_input_buffers(counted_graphs):
    """The batch copied into the static buffers must never be written back into the caller's tensors
    (a loader's reused buffer, or a view of the data)."""
    graphed, amp = _graphed()
    data = torch.arange(2 * (WARMUP + 4) * 16, dtype=torch.float32).view(-1, 1, 4, 4)
    labels = torch.arange(len(data))
    original, original_labels = data.clone(), labels.clone()
    batches = iter([(data[i:i + 2], labels[i:i + 2]) for i in range(0, len(data), 2)])
    for step in range(1, WARMUP + 4):
        graphed({}, {}, amp, lambda: next(batches), tiny("dcgan"), step, Aids())
    assert torch.equal(data, original) and torch.equal(labels, original_labels)


def test_reset_warms_up_and_captures_again(counted_graphs):
    """After a rollback (new optimizer state, new rates) the step is warmed up and captured anew, not
    replayed from, or run uncaptured on, the old graph's buffers."""
    graphed, amp = _graphed()
    batch = (torch.zeros(2, 1, 4, 4), None)
    step = 0
    for _ in range(WARMUP + 2):
        step += 1
        graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
    assert counted_graphs.made == 1
    graphed.reset()
    for _ in range(WARMUP):
        step += 1
        graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
        assert graphed.static_in is None and graphed.graph is None  # warming up again, eagerly
    step += 1
    graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
    assert counted_graphs.made == 2 and graphed.graph.replays == 1


def test_after_a_failed_capture_the_eager_steps_keep_autocast_s_cache(counted_graphs, monkeypatch):
    """Once capture failed, every step runs eagerly for good: with autocast's weight-cast cache on, as an
    eager run has it (off is only for steps that will be captured)."""
    import aigc_cli.training.graph as graph_mod

    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graph_mod.torch.cuda, "graph", refuse)
    monkeypatch.setattr(graph_mod.torch.cuda, "synchronize", lambda: None)
    seen = []
    graphed, amp = _graphed(seen)
    batch = (torch.zeros(2, 1, 4, 4), None)
    for step in range(1, WARMUP + 4):
        graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
    assert graphed.failed
    assert seen == [True] * WARMUP + [False] * 3
    assert amp.graph_safe is False


def test_a_warm_up_step_gives_autocast_s_cache_back(counted_graphs):
    """A run that ends (or fails) during the warm-up leaves the cache setting as it found it: sampling and
    evaluation afterwards run with the cache on."""
    graphed, amp = _graphed()
    graphed({}, {}, amp, lambda: (torch.zeros(2, 1, 4, 4), None), tiny("dcgan"), 1, Aids())
    assert amp.graph_safe is False

    def boom(*args):
        raise RuntimeError("out of memory")

    failing = GraphedStep(boom, {}, {}, amp, tiny("dcgan"), Aids())
    failing.capture = True
    with pytest.raises(RuntimeError, match="out of memory"):
        failing({}, {}, amp, lambda: (torch.zeros(2, 1, 4, 4), None), tiny("dcgan"), 1, Aids())
    assert amp.graph_safe is False
