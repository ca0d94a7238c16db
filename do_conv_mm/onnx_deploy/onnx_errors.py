"""The ONNX export tool's errors: one line naming the problem and its fix."""
from typing import Any, Dict

__all__ = ['DeployError', 'DeployVerificationError']


class DeployError(ValueError):
    """An expected, user-fixable problem; the message is one line naming it and the fix."""


class DeployVerificationError(DeployError):
    """``verify`` found ONNX Runtime outputs beyond tolerance; ``report`` holds everything."""

    def __init__(self, message: str, report: Dict[str, Any]):
        super().__init__(message)
        self.report = report
