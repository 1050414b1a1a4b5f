"""slimtorch: post-training compression of PyTorch models, measured.

    import slimtorch
    qmodel = slimtorch.quantize(model, "w4a4", calib_data, seed=0)
    slimtorch.save(qmodel, "out/")
    qmodel = slimtorch.load("out/")
    report = slimtorch.export_onnx(qmodel, "model.onnx", example_inputs)
    print(slimtorch.inspect(qmodel, model, calib_batch).table())  # worst layers by SQNR
"""
__version__ = "0.1.0"

from .api import export_onnx, inspect, load, quantize, save  # noqa: E402
from .errors import SlimtorchError  # noqa: E402
from .recipe import Recipe, resolve_recipe  # noqa: E402

__all__ = ["quantize", "save", "load", "export_onnx", "inspect", "Recipe", "resolve_recipe", "SlimtorchError",
           "__version__"]
