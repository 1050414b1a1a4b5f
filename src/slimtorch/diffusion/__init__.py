"""Diffusion models: the DDPM noise schedule, DDIM/DDPM samplers (``schedule``), calibration sets
drawn from the float model's own sampling trajectory (``calibration``), PTQD noise correction
(``ptqd``) and the Fréchet-distance family of sample metrics on a domain classifier
(``metrics``)."""
from .schedule import DDPMSchedule, eps_of, sample, timesteps_for  # noqa: F401
