"""The hyper-representation autoencoder (002 §3, 000 §2), top to bottom.

weights [B, P] -> tokens [B, T, D] (one per neuron / kernel) -> per-layer linear embedding
+ learned positions, compression token(s) prepended -> transformer encoder -> the compression
tokens' outputs, concatenated -> linear -> tanh = z [B, latent]. There are ceil(latent / d_model)
compression tokens, so z can have full rank (one d_model-wide token would cap it at d_model).
The decoder mirrors it: linear from z to the whole sequence, + positions, transformer, per-layer
linear back to token weights -> [B, P]. A small MLP projection head maps z to the space of the
contrastive loss.

With ``model.linear_path`` a fixed linear encoder/decoder pair runs beside the transformers:
z = tanh(transformer part + linear part), weights = transformer part + linear part. The linear
pair is PCA of the training split with latent_dim components and the transformer parts start at
zero, so training begins at the linear yardstick and the transformers learn what PCA misses. It
needs unpermuted inputs (an aligned zoo, ``augment.permute=false``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysys.architectures import Layout
from raysys.config import RaysysError
from raysys.hyperrep.checkpoint import HubCheckpoint, load_checkpoint, save_checkpoint
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.tokens import Tokenizer


def _transformer(cfg) -> nn.TransformerEncoder:
    block = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff, cfg.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(block, cfg.layers, norm=nn.LayerNorm(cfg.d_model), enable_nested_tensor=False)


class HyperRepresentation(nn.Module, HubCheckpoint):  # HubCheckpoint: save_pretrained / from_pretrained
    def __init__(self, config: HyperRepConfig, layout: Layout):
        super().__init__()
        self.config, self.layout = config, layout
        m = config.model
        self.tokenizer = Tokenizer(layout)
        T, G = self.tokenizer.num_tokens, self.tokenizer.num_groups
        widths = [g.width for g in self.tokenizer.groups]

        # encoder
        self.embed = nn.ModuleList(nn.Linear(w, m.d_model) for w in widths)
        self.enc_pos = nn.Parameter(0.02 * torch.randn(1, T, m.d_model))
        self.num_compression = -(-m.latent_dim // m.d_model)
        self.compression_token = nn.Parameter(0.02 * torch.randn(1, self.num_compression, m.d_model))
        self.encoder = _transformer(m)
        self.to_latent = nn.Linear(self.num_compression * m.d_model, m.latent_dim)
        # decoder
        self.from_latent = nn.Linear(m.latent_dim, T * m.d_model)
        self.dec_pos = nn.Parameter(0.02 * torch.randn(1, T, m.d_model))
        self.decoder = _transformer(m)
        self.unembed = nn.ModuleList(nn.Linear(m.d_model, w) for w in widths)
        # Decoded weights start near zero. With torch's default init they start several sigma off,
        # and the first large gradients collapse z to the zoo mean, from which training escapes
        # only slowly (measured on 16 cnn_s models: R^2 0.03 vs 0.98 after 300 steps).
        with torch.no_grad():
            for head in self.unembed:
                head.weight.mul_(0.01)
                head.bias.zero_()
        if m.linear_path:  # PCA-initialized by init_linear_path; the transformers start silent
            P = layout.num_params
            # Buffers, not parameters: PCA is already the best linear code of the training split, and Adam's
            # per-weight steps would wreck it (measured: validation R² fell from PCA's to -0.9 in one epoch).
            self.register_buffer("linear_encoder", torch.zeros(m.latent_dim, P))
            self.register_buffer("linear_decoder", torch.zeros(P, m.latent_dim))
            self.register_buffer("param_mean", torch.zeros(P))
            with torch.no_grad():
                for layer in (self.to_latent, *self.unembed):
                    layer.weight.zero_()
                    layer.bias.zero_()
        # contrastive projection head
        self.projection = nn.Sequential(nn.Linear(m.latent_dim, m.projection_dim), nn.GELU(),
                                        nn.Linear(m.projection_dim, m.projection_dim))
        # LWLN statistics of the training split, saved with the model (000 §3.1).
        self.register_buffer("lwln_mean", torch.zeros(G))
        self.register_buffer("lwln_std", torch.ones(G))

    # --- the network -------------------------------------------------------------------------

    def encode_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [B, P] -> z [B, latent]."""
        pre = self.encode_tokens(self.tokenizer.tokenize(weights))
        if self.config.model.linear_path:
            pre = pre + (weights - self.param_mean) @ self.linear_encoder.T
        return torch.tanh(pre)

    def decode_weights(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent] -> weights [B, P]."""
        weights = self.tokenizer.detokenize(self.decode_tokens(z))
        if self.config.model.linear_path:
            weights = weights + self.param_mean + z @ self.linear_decoder.T
        return weights

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> the transformer's part of z before tanh [B, latent]."""
        x = torch.cat([emb(tokens[:, g.start:g.start + g.count, :g.width])
                       for emb, g in zip(self.embed, self.tokenizer.groups)], dim=1)
        x = x + self.enc_pos
        x = torch.cat([self.compression_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.to_latent(x[:, :self.num_compression].flatten(1))

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent] -> [B, T, D] (padding entries zero)."""
        T, D = self.tokenizer.num_tokens, self.tokenizer.token_dim
        x = self.from_latent(z).view(z.shape[0], T, -1) + self.dec_pos
        x = self.decoder(x)
        return torch.cat([nn.functional.pad(head(x[:, g.start:g.start + g.count]), (0, D - g.width))
                          for head, g in zip(self.unembed, self.tokenizer.groups)], dim=1)

    def forward(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weights [B, P] -> (z [B, latent], reconstruction [B, P], projection [B, projection_dim])."""
        z = self.encode_weights(weights)
        return z, self.decode_weights(z), self.projection(z)

    # --- LWLN ----------------------------------------------------------------------------------

    def set_layer_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.lwln_mean.copy_(mean)
        self.lwln_std.copy_(std)

    def loss_weights(self) -> torch.Tensor | None:
        """Per-parameter 1 / sigma_l^2 [P] when LWLN is on, else None (plain MSE)."""
        if not self.config.loss.lwln:
            return None
        return self.lwln_std[self.tokenizer.param_group].pow(-2)

    # --- the linear path ---------------------------------------------------------------------

    @torch.no_grad()
    def init_linear_path(self, weights: torch.Tensor, scale: float = 0.05) -> None:
        """Set the linear path to PCA of ``weights`` (the training split).

        Component i's coefficient c_i (std s_i over the training rows) enters z as tanh(scale * c_i / s_i),
        in tanh's near-linear range, and the decoder maps it back: at initialization the autoencoder is
        PCA-k up to tanh's curvature. Plain PCA, not PCA of the weights standardized per layer: on an aligned
        digits zoo that scored test R² -0.028 and 75.6 % decoded accuracy against plain PCA's 0.073 and 77.0 %."""
        if not self.config.model.linear_path:
            raise RaysysError("init_linear_path needs model.linear_path=true in the hyper-representation config")
        w = weights.double().to(self.param_mean.device)
        self.param_mean.copy_(w.mean(0).float())
        x = w - w.mean(0)
        k = self.config.model.latent_dim
        _, sv, vt = torch.linalg.svd(x, full_matrices=False)
        n = min(k, vt.shape[0])
        std = (sv[:n] / max(1, len(w) - 1) ** 0.5).clamp_min(1e-12)
        enc, dec = torch.zeros(k, w.shape[1], dtype=torch.float64), torch.zeros(w.shape[1], k, dtype=torch.float64)
        enc[:n], dec[:, :n] = vt[:n] * (scale / std)[:, None], (vt[:n] * (std / scale)[:, None]).T
        self.linear_encoder.copy_(enc.float())
        self.linear_decoder.copy_(dec.float())

    # --- public API: batched, no grad ----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.compression_token.device

    @torch.no_grad()
    def encode(self, weights, batch_size: int = 1024):
        """weights [n, P] (tensor or ndarray) -> z [n, latent] of the same kind, on the CPU."""
        self.check_width(weights.shape[-1])
        return self._batched(self.encode_weights, weights, batch_size)

    @torch.no_grad()
    def decode(self, z, batch_size: int = 1024):
        """z [n, latent] (tensor or ndarray) -> weights [n, P] of the same kind, on the CPU."""
        if z.shape[-1] != self.config.model.latent_dim:
            raise RaysysError(f"latents have {z.shape[-1]} dimensions but this hyper-representation's "
                              f"latent_dim is {self.config.model.latent_dim}: pass z from this model's encode().")
        return self._batched(self.decode_weights, z, batch_size)

    def _batched(self, fn, x, batch_size):
        as_numpy = isinstance(x, np.ndarray)
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if as_numpy else x.float()
        was_training = self.training
        self.eval()
        try:
            out = torch.cat([fn(x[i:i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]) \
                if len(x) else torch.zeros(0)
        finally:
            self.train(was_training)
        return out.numpy() if as_numpy else out

    # --- compatibility and persistence ---------------------------------------------------------

    def check_width(self, width: int) -> None:
        if width != self.layout.num_params:
            raise RaysysError(
                f"weights have {width} parameters but this hyper-representation was trained on "
                f"'{self.layout.arch}' models with {self.layout.num_params}: use a checkpoint trained on a zoo "
                f"of this architecture (raysys hyperrep train CONFIG --zoo DIR --out DIR).")

    def check_layout(self, layout: Layout, what: str = "the zoo") -> None:
        """Raise a clear error unless ``layout`` is the architecture this model was trained on."""
        if layout.to_dict() != self.layout.to_dict():
            raise RaysysError(
                f"{what} holds '{layout.arch}' models ({layout.num_params} parameters, {layout.in_channels} input "
                f"channels, {layout.num_classes} classes) but this hyper-representation was trained on "
                f"'{self.layout.arch}' models ({self.layout.num_params} parameters, {self.layout.in_channels} input "
                f"channels, {self.layout.num_classes} classes). Use a checkpoint trained on a zoo of the same "
                f"architecture, or train one with 'raysys hyperrep train CONFIG --zoo DIR --out DIR'.")

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        return save_checkpoint(self, directory, meta or {})

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "HyperRepresentation":
        return load_checkpoint(cls, directory, device)


def load_for_zoo(directory: str | Path, zoo_dir: str | Path, device: str = "cpu") -> HyperRepresentation:
    """Load a checkpoint and check that ``zoo_dir`` holds the architecture it was trained on."""
    from raysys.store import open_zoo

    model = HyperRepresentation.load(directory, device)
    model.check_layout(open_zoo(zoo_dir).layout, what=f"zoo {zoo_dir}")
    return model
