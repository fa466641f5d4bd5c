"""The populations stage's config: which methods, how to sample, fine-tune, measure novelty and track.

Unknown keys are errors (:class:`raysys.config.Config`); ``raysys populations run CONFIG`` and the pipeline's
``populations:`` section load it through :func:`raysys.config.load`.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysys.config import Config, RaysysError
from raysys.populations import samplers

# B_noise whose sigma is calibrated so that the population's novelty / diversity (the report's
# measures, as generated) equals that of matched_noise.target: Zeng et al. 2025's comparison.
MATCHED = {"B_noise_novelty": "novelty", "B_noise_diversity": "diversity"}
BASE_METHODS = ("S_KDE", "S_KDE30", "S_KDE_joint", "S_U", "B_KDE30", "B_T", "B_F", *MATCHED)
NOISE = re.compile(r"^B_noise_(\d+(\.\d+)?)$")


def _check_methods(methods: list[str]) -> list[str]:
    for m in methods:
        if m not in BASE_METHODS and not NOISE.match(m):
            raise ValueError(f"unknown method '{m}'; choose from {', '.join(BASE_METHODS)} or B_noise_<sigma> "
                             f"(e.g. B_noise_0.02)")
    if len(set(methods)) != len(methods):
        raise ValueError("methods are listed twice; list each once")
    return methods


class SamplingConfig(Config):
    bandwidth: float | Literal["scott", "silverman"] = "scott"
    top_fraction: float = Field(0.3, gt=0, le=1)
    batch_size: int = Field(512, ge=1, description="latents decoded per autoencoder call")

    @field_validator("bandwidth")
    @classmethod
    def _positive(cls, v):
        # 0 would return copies of the training embeddings (the reference code's defect), < 0 is meaningless
        if not isinstance(v, str) and not v > 0:
            raise ValueError(f"sampling.bandwidth must be > 0 (latent units) or 'scott'/'silverman', got {v}")
        return v


class FinetuneConfig(Config):
    budgets: list[int] = [0, 1, 5, 25]
    # None: use the zoo's own training hyperparameter (the same for every method).
    optimizer: Literal["adam", "sgd"] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    seed: int = Field(1_000_000, ge=0, description="fine-tuning seeds (data order, dropout; B_T init) are seed + i")
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v):
        if not v or any(b < 0 for b in v) or sorted(set(v)) != v:
            raise ValueError("budgets must be a non-empty increasing list of epochs >= 0, e.g. [0, 1, 5, 25]")
        return v


class TransferConfig(Config):
    dataset: str = "fontdigits"
    dataset_options: dict = {}
    methods: list[str] = ["S_KDE30", "B_F", "B_T"]
    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        return _check_methods(v)


class MatchedNoiseConfig(Config):
    """B_noise_novelty / B_noise_diversity: B_noise with sigma calibrated on a sampled population."""

    target: str = Field("S_KDE30", description="the sampled population whose novelty / diversity is matched")
    tolerance: float = Field(0.02, gt=0, lt=1, description="relative: |achieved - target| <= tolerance * target")
    max_iter: int = Field(40, ge=1, description="root-finding iterations on sigma (each one noise draw, no training)")

    @field_validator("target")
    @classmethod
    def _sampled(cls, v):
        if v not in (*samplers.SAMPLER_NAMES, "B_KDE30"):
            raise ValueError(f"matched_noise.target must be a sampled population ({', '.join(samplers.SAMPLER_NAMES)}"
                             f" or B_KDE30); got '{v}'")
        return v


class NoveltyConfig(Config):
    align: bool = True
    # Training-model states to compare against; None = the zoo_epochs the anchors come from.
    reference_epochs: list[int] | None = None


class TrackingConfig(Config):
    tracking_uri: str | None = None  # absolute sqlite:////... ; None = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "raysys-populations"
    enabled: bool = True


class PopulationsConfig(Config):
    seed: int = Field(0, ge=0)
    num_models: int = Field(50, ge=2)
    # Zoo epochs whose training-split states are the KDE anchors; None = the autoencoder's own
    # training window (its config's train.epoch_window), e.g. 21..25 (000 §4.1).
    zoo_epochs: list[int] | None = None
    dataset_options: dict = {}
    methods: list[str] = ["S_KDE", "S_KDE30", "B_KDE30", "B_T", "B_noise_0.02", "B_noise_0.04", "S_U"]
    sampling: SamplingConfig = SamplingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    transfer: TransferConfig | None = TransferConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    matched_noise: MatchedNoiseConfig = MatchedNoiseConfig()

    @property
    def anchor_epochs(self) -> list[int]:
        """``zoo_epochs`` once :func:`prepare` has resolved it."""
        if self.zoo_epochs is None:
            raise RaysysError("zoo_epochs is not resolved yet: call populations.stage.prepare(config, zoo, autoencoders) "
                              "first, or set zoo_epochs in the config")
        return self.zoo_epochs
    mlflow: TrackingConfig = TrackingConfig()

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        return _check_methods(v)

    @model_validator(mode="after")
    def _no_bf_in_dataset(self):
        if "B_F" in self.methods:
            raise ValueError("B_F (source-zoo models fine-tuned on a target) is a transfer baseline; "
                             "list it under transfer.methods")
        matched = [m for m in [*self.methods, *(self.transfer.methods if self.transfer else [])] if m in MATCHED]
        if matched and self.matched_noise.target not in self.methods:
            raise ValueError(f"{matched[0]} is calibrated on matched_noise.target={self.matched_noise.target}, which "
                             f"is not in methods; add it to methods or set matched_noise.target to one that is")
        return self
