"""Rich progress bars for long-running commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from m3sb.merge import MergePlan


@contextmanager
def merge_progress(
    console: Console,
) -> Iterator[tuple[Callable[[MergePlan], None], Callable[[str, int], None]]]:
    """A bar over the bytes of merged tensors; yields the engine's plan and tensor callbacks."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        transient=True,
    )
    task = progress.add_task("merging", total=None, tensor="")

    def on_plan(plan: MergePlan) -> None:
        progress.update(task, total=sum(info.nbytes for info in plan.layout.values()))

    def on_tensor(name: str, nbytes: int) -> None:
        progress.update(task, advance=nbytes, tensor=name)

    with progress:
        yield on_plan, on_tensor
