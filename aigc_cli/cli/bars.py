"""Live progress lines that fit the terminal's width.

rich shares out a line that is too narrow by squeezing its widest columns first: at 80 columns the
training line's losses took the room of the step count and the time left, which were cut to "…", and the
bar's fixed 40 columns pushed `sample`'s counts off the line. Here what says how far the work is (counts,
times, rate) stays whole; text that can be cut (a `Cut` column: the losses) is cut at its end, and the bar
takes what is left, up to 40 columns, and is left out below 5."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text

BAR_MAX, BAR_MIN = 40, 5


class Cut(ProgressColumn):
    """task.fields[key], cut at its end to the width the line leaves it."""

    def __init__(self, key: str):
        super().__init__(table_column=Column(no_wrap=True))
        self.key, self.width = key, None

    def render(self, task: Task) -> Text:
        text = Text(str(task.fields.get(self.key, "")), no_wrap=True)
        if self.width is not None and text.cell_len > self.width:
            if self.width <= 0:
                return Text("")
            text.truncate(self.width, overflow="ellipsis")
        return text


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
        wanted = max(1, len(str(task.fields.get(cut.key, "")))) if cut else 0
        if room >= wanted + BAR_MIN:
            bar.bar_width = min(BAR_MAX, room - wanted)
        elif room >= 2 * BAR_MIN + 20:  # a short bar still, and the text cut
            bar.bar_width = 2 * BAR_MIN
        else:
            bar.bar_width = 0
        if cut:  # text cut to under 10 columns says nothing: then none
            left = room - (bar.bar_width if bar.bar_width >= BAR_MIN else 1)
            cut.width = left if left >= 10 else 0
