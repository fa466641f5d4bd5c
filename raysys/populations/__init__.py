"""New models from a zoo: latent samplers, baselines, fine-tuning on Ray actors, novelty, reports.

Entry point: :func:`run_populations` with a :class:`PopulationsConfig` (``config``).
"""
from raysys.populations.samplers import KDESampler, UniformSampler, make_sampler, noise_population
from raysys.populations.config import PopulationsConfig
from raysys.populations.stage import run_populations

__all__ = ["KDESampler", "UniformSampler", "make_sampler", "noise_population", "PopulationsConfig", "run_populations"]
