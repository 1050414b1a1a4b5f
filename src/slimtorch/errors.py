"""Errors slimtorch raises for bad input.

Every error says what is wrong and what to change. They subclass ValueError so callers that
already catch ValueError keep working.
"""


class SlimtorchError(ValueError):
    """Base class: a problem with the user's input, data, recipe or artifact."""


class DatasetNotFoundError(SlimtorchError, FileNotFoundError):
    """A dataset the command needs is not installed."""


class RecipeError(SlimtorchError):
    """A recipe is malformed (unknown key, bad value); the message names the key and line."""


class CalibrationDataError(SlimtorchError):
    """Calibration data is empty, or holds NaN/inf."""


class ArtifactError(SlimtorchError):
    """A saved artifact is missing, truncated or has been tampered with."""


class UnknownModelError(SlimtorchError, KeyError):
    """A model name (zoo:NAME, torchvision:NAME, ...) is not known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SharedLayerError(SlimtorchError):
    """A layer runs more than once per forward, which unit-wise reconstruction cannot fit."""


class CalibrationWarning(UserWarning):
    """Calibration data was enough to run, but too little for part of a method (named)."""


class RotationError(SlimtorchError):
    """A model's structure does not let an orthogonal rotation be fused into its weights
    exactly (a LayerNorm's mean subtraction, a norm bias, a residual add of no layer's output)."""


class MaskError(SlimtorchError):
    """A sparsity mask or pattern does not fit the layer or model it is applied to (a shape
    mismatch, an N:M pattern whose M does not divide the layer's inputs, a sparsity outside
    (0, 1))."""


class ReportError(SlimtorchError):
    """``slimtorch report`` cannot build a report from what it was given (no directory, an
    output path it cannot write, matplotlib missing)."""

class DataFreeError(SlimtorchError):
    """Data-free calibration cannot run on this model (no BatchNorm statistics and no
    attention to match), or its settings are invalid."""


class IntegerOnlyError(SlimtorchError):
    """A model cannot run integer-only: an op without an integer kernel, a layout the integer
    kernels do not take (grouped or dilated convs), or an uncalibrated model."""


class PruningError(SlimtorchError):
    """A structured-pruning target or pin that cannot be met, or a model the channel rules
    cannot prune safely."""


class DiffusionError(SlimtorchError):
    """A diffusion recipe or sampler asked for something the model or schedule cannot give
    (a model without a time-step argument, more calibration steps than the schedule has)."""
