"""The hyper-representation config: model size, loss, augmentations, training. Unknown keys are errors."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raysys.config import Config


class ModelConfig(Config):
    d_model: int = Field(128, gt=0, description="token embedding width")
    heads: int = Field(4, gt=0, description="attention heads; must divide d_model")
    layers: int = Field(2, gt=0, description="transformer blocks in the encoder and in the decoder")
    ff: int = Field(512, gt=0, description="feed-forward width inside each transformer block")
    latent_dim: int = Field(32, gt=0, description="size of the hyper-representation z")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    projection_dim: int = Field(64, gt=0, description="output width of the contrastive projection head")
    linear_path: bool = Field(False, description="a linear encoder/decoder beside the transformers, initialized as "
                              "PCA of the training split: the autoencoder starts at PCA-k and learns the rest. "
                              "Needs augment.permute=false (use an aligned zoo: raysys zoo align)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model}); "
                             f"pick e.g. d_model={self.heads * max(1, round(self.d_model / self.heads))}")
        return self


class LossConfig(Config):
    beta: float = Field(0.9, ge=0.0, le=1.0, description="L = beta * reconstruction + (1 - beta) * contrastive")
    temperature: float = Field(0.1, gt=0.0)
    contrastive: Literal["ntxent", "positive"] = "ntxent"
    lwln: bool = Field(True, description="layer-wise loss normalization (000 §3.1)")


class AugmentConfig(Config):
    permute: bool = True
    erase_p: float = Field(0.5, ge=0.0, le=1.0)
    erase_low: float = Field(0.03, ge=0.0, le=1.0)
    erase_high: float = Field(0.3, ge=0.0, le=1.0)
    noise_std: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.erase_low > self.erase_high:
            raise ValueError(f"erase_low ({self.erase_low}) is above erase_high ({self.erase_high}); swap them")
        return self


class TrainConfig(Config):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    schedule: Literal["cosine", "plateau"] = "cosine"
    patience: int = Field(30, gt=0, description="stop after this many epochs without a better validation reconstruction")
    keep: Literal["best", "last"] = Field("best", description="checkpoint kept: 'best' validation reconstruction "
                                          "(with early stopping after `patience`), or the 'last' epoch (no early stopping)")
    epoch_window: tuple[int, int] = Field((21, 25), description="zoo epochs used as training data, inclusive")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: the forward pass under bfloat16 autocast "
                                                "(CUDA; CPUs with AVX512-BF16 or AMX — elsewhere it is slower), losses in fp32")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch during training (None: torch's default). "
                                "1 is fastest on a busy shared machine, where threads spin waiting for cores")

    @model_validator(mode="after")
    def _window(self):
        a, b = self.epoch_window
        if a < 0 or a > b:
            raise ValueError(f"epoch_window {list(self.epoch_window)} must be [first, last] with 0 <= first <= last")
        return self


class HyperRepConfig(Config):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _linear_path_needs_fixed_order(self):
        if self.model.linear_path and self.augment.permute:
            raise ValueError("model.linear_path=true needs augment.permute=false: a linear map of the weights "
                             "cannot follow random unit orders. Align the zoo first (raysys zoo align ZOO --out "
                             "ALIGNED) and set augment.permute=false, or set model.linear_path=false")
        return self
