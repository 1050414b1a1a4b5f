"""Quantization methods, one module each, registered with ``slimtorch.methods``:

    @register_method("name", NameConfig)
    def apply(model, cfg: NameConfig, ctx: MethodContext) -> dict

A method runs after quantizers are attached and calibrated, before weights are frozen, on the
config its recipe entry validated to (every ``auto`` resolved); ``ctx`` carries the recipe,
calibration batches, seed, the untouched float model (BN not folded) and a work dir for
resumable state. The registry imports every module of this package on first use: adding a
method is adding a module (and its recipe files), nothing here.
"""
