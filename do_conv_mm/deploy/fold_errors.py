"""The fold's errors: one line naming the problem and its fix (also used by the tools that
write checkpoints through :mod:`.output_checks` / :mod:`.atomic_write`)."""
from typing import List

from ..deploy_verify import OutputDiff

__all__ = ['FoldError', 'FoldVerificationError']


class FoldError(ValueError):
    """An expected, user-fixable problem; the message is one line naming it and the fix."""


class FoldVerificationError(FoldError):
    """``verify`` found outputs beyond tolerance; ``diffs`` holds every comparison."""

    def __init__(self, message: str, diffs: List[OutputDiff]):
        super().__init__(message)
        self.diffs = diffs
