"""Live progress lines that fit the terminal's width.

rich shares out a line that is too narrow by squeezing its widest columns first: at 80 columns the
training line's losses took the room of the step count and the time left, which were cut to "…", and the
bar's fixed 40 columns pushed `sample`'s counts off the line. Here what says how far the work is (counts,
times, rate) stays whole; text that can be cut (a `Cut` column: training's losses, sample's and eval's
label, which may hold a long path) is cut at its end, and the bar takes what is left, up to 40 columns."""

from __future__ import annotations

from collections.abc import Callable

from rich.progress import BarColumn, Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text

BAR_MAX, BAR_MIN = 40, 5
TEXT_MIN = 10  # text cut shorter says nothing: the room goes to the bar instead


class Cut(ProgressColumn):
    """Text of the task (`text(task)`), cut at its end to the width the line leaves it: at the last `sep`
    that fits, where it has one ("loss_d 1.234  …", not "loss_d 1.2…"), else anywhere."""

    def __init__(self, text: Callable[[Task], str], sep: str | None = None):
        super().__init__(table_column=Column(no_wrap=True))
        self.text, self.sep, self.width = text, sep, None

    def render(self, task: Task) -> Text:
        full = str(self.text(task))
        if self.width is None or len(full) <= self.width:
            return Text(full, no_wrap=True)
        if self.width <= 0:
            return Text("")
        head = full[:self.width - 1]
        if self.sep and self.sep in head:
            head = head[:head.rindex(self.sep) + len(self.sep)]
        return Text(head + "…", no_wrap=True)


class Bar(BarColumn):
    """A bar whose width the line sets; none at all where it would be under BAR_MIN columns."""

    def __init__(self):
        super().__init__(bar_width=BAR_MAX, table_column=Column(no_wrap=True))

    def render(self, task: Task):
        return Text("") if self.bar_width < BAR_MIN else super().render(task)


class FittedProgress(Progress):
    """A Progress whose columns (one Bar, at most one Cut, the rest kept whole) fit the console's width."""

    def get_renderables(self):
        if self.tasks:
            self.fit(self.tasks[0])
        yield self.make_tasks_table(self.tasks)

    def fit(self, task: Task) -> None:
        bar = next(c for c in self.columns if isinstance(c, Bar))
        cut = next((c for c in self.columns if isinstance(c, Cut)), None)
        whole = [c for c in self.columns if c is not bar and c is not cut]
        # rich gives an empty column one cell (a time left not yet known, say), and one space between columns
        used = sum(max(1, self.console.measure(c.render(task)).maximum) for c in whole) + len(self.columns) - 1
        room = self.console.width - used
        wanted = max(1, len(str(cut.text(task)))) if cut else 1
        if room >= wanted + BAR_MIN:  # all of it, and a bar of what is left
            bar_width, text_width = min(BAR_MAX, room - wanted), wanted
        else:  # the text cut; a bar that grows with the room alone, so it does not jump with the text
            bar_width = min(BAR_MAX, max(0, (room - 30) // 2))
            bar_width = bar_width if bar_width >= BAR_MIN else 0
            text_width = room - max(1, bar_width)
            if text_width < TEXT_MIN:
                text_width, bar_width = 0, room - 1
        bar.bar_width = bar_width if bar_width >= BAR_MIN else 0
        if cut:
            cut.width = text_width
