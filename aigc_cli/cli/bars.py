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
        head = full[:self.width - 1]
        if self.sep and self.sep in head:
            head = head[:head.rindex(self.sep) + len(self.sep)]
        return Text(head + "…", no_wrap=True)


class Bar(BarColumn):
    """A bar whose width the line sets (FittedProgress leaves it out where it would be under BAR_MIN)."""

    def __init__(self):
        super().__init__(bar_width=BAR_MAX, table_column=Column(no_wrap=True))


class FittedProgress(Progress):
    """A Progress whose columns (one Bar, at most one Cut, the rest kept whole) fit the console's width.
    A bar or text with no room is left out of the line, with the space beside it."""

    def get_renderables(self):
        columns = self.columns
        if self.tasks:
            self.columns = self.fit(self.tasks[0])
        table = self.make_tasks_table(self.tasks)  # renders every cell now, with the columns kept
        self.columns = columns
        yield table

    def fit(self, task: Task) -> tuple:
        """Sets the bar's and the text's widths; returns the columns to draw."""
        bar = next(c for c in self.columns if isinstance(c, Bar))
        cut = next((c for c in self.columns if isinstance(c, Cut)), None)
        whole = [c for c in self.columns if c is not bar and c is not cut]
        # rich gives an empty column one cell (a time left not yet known, say); one space between columns
        # c(task): rich's cached rendering, the one the table then draws
        used = sum(max(1, self.console.measure(c(task)).maximum) for c in whole) + len(whole) - 1
        room = self.console.width - used  # for the bar and the text, each with its space
        wanted = len(str(cut.text(task))) if cut else 0
        if room >= wanted + 1 + BAR_MIN + 1:  # all of the text, and a bar of what is left
            text_width, bar_width = wanted, min(BAR_MAX, room - (wanted + 1 if cut else 0) - 1)
        else:  # the text cut, beside a bar of a third of the room
            bar_width = room // 3 - 1 if room // 3 - 1 >= BAR_MIN else 0
            text_width = room - (bar_width + 1 if bar_width else 0) - 1
            if text_width < TEXT_MIN:  # too little to say anything: the bar instead
                text_width, bar_width = 0, room - 1
            elif cut:  # cut between two values, the text may take less: the bar has the rest
                cut.width = text_width
                shown = len(cut.render(task).plain)
                bar_width = min(BAR_MAX, bar_width + (text_width - shown) if bar_width else
                                (text_width - shown - 1 if text_width - shown - 1 >= BAR_MIN else 0))
                text_width = shown
        bar.bar_width = bar_width if bar_width >= BAR_MIN else 0
        if cut:
            cut.width = text_width
        return tuple(c for c in self.columns
                     if not (c is bar and not bar.bar_width) and not (c is cut and not text_width))
