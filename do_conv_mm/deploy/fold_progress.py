"""What the fold shows while it runs: a rich progress bar (optional) and one line per
checkpoint folded."""
from .fold_run import FoldResult

__all__ = ['ProgressBar', 'summary_line']


def summary_line(result: FoldResult) -> str:
    """One log line per folded checkpoint: layers, paths, seconds per stage."""
    s = result.seconds
    timing = ', '.join(f'{k} {v:.2f}s' for k, v in s.items())
    ema = ' (+ folded ema_state_dict: the raw weights)' if result.kept_ema else ''
    src = ', EMA weights' if result.kept_ema else ''
    return (f'folded {result.num_folded} DOConv layers{src}: {result.checkpoint} -> '
            f'{result.out}{ema} [{timing}]')


class ProgressBar:
    """Context manager yielding ``advance()``; a rich bar when enabled, else a no-op."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self._bar = Progress(TextColumn('folding'), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._bar.start()
        task = self._bar.add_task('fold', total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False
