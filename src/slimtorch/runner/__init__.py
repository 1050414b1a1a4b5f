"""The block-sequential runner, written once: units from the captured graph (``units``), their
inputs propagated unit by unit and cached in a bounded pool with resumable per-unit state
(``recon_cache``), and the reconstruction loop with pluggable per-unit terms (``recon``).
Methods (``slimtorch.algorithms``) configure stages and terms; the runner knows none of them.
"""
