"""Vectorized population trainer: many models of one architecture train as one batched computation.

Every model keeps the semantics of :func:`raysys.train.train_one` (the ground truth): its own
initialization (or given start weights), its own data order and dropout masks from its own
generators, its own learning rate and weight decay, torch.optim's Adam/SGD update rule. What
changes is the shape of the computation: parameters live in one ``[N, P]`` tensor in the
canonical flat layout, and each layer runs for all N models at once as a batched matmul.

Kernels (why they look the way they do; measured on CPU, see benchmarks/zoo_throughput.py):

* Convolutional activations are ``[B, N*C, H, W]`` with model i's channels as group i, so
  every conv is ONE grouped ``conv2d`` (groups=N) over all models, and the activations live in
  channels-last memory, where oneDNN's grouped convolutions and torch's CPU max-pool are
  2-3x faster than in NCHW. Linear layers are ``bmm`` over ``[N, B, F]``.
* During training, a first conv layer followed by max-pooling runs as one autograd function
  over slices of a few images (:class:`_ConvPool`): each slice's conv output (about 0.45 MB per
  image at 24 CNN-s models) stays in cache through pooling and, in backward, through the
  pooling gradient and the weight gradient, instead of a multi-MB tensor making four trips to
  memory per step (measured: a third of a training step). Pooling is torch's own kernel, so
  ties and NaNs behave as in ``train_one``. Two models share one oneDNN group there when a
  model has 8 output channels (oneDNN fills 16 lanes per group either way), and the bias
  gradient is the sum of the pooled gradient.
* Bias gradients of the other convs are plain sums too (:class:`_GroupedConv`): oneDNN's bias
  reduction inside its convolution backward cost 10-35 % of that backward.
* tanh is ``2*sigmoid(2x) - 1`` (:class:`_Tanh`): torch's CPU tanh is about 5x slower than its
  sigmoid (measured on AVX-512), and the two agree to 2e-7; the gradient is torch's own
  ``tanh_backward``. The other activations are torch's ops.
* Evaluation shows the same images to every model, so the first layer is ONE GEMM of the
  shared im2col rows (plus a ones column for the bias) against all models' kernels side by
  side, landing directly in channels-last layout; its im2col rows, pooled output and
  activations reuse their buffers (fresh memory costs page faults on every chunk).
* Parameters and Adam moments are single ``[N, P]`` tensors: the optimizer is a handful of
  elementwise ops per step with per-model lr / weight decay columns.
* Nothing reduces across the model axis (the loss is summed only to seed backward, which
  gives every model the gradient of its own loss), so a diverged model cannot leak NaN into
  the others.

``tetris_ffn``, ``cnn_s`` and ``cnn_m`` (plain conv/pool/act/dropout/linear chains) use this
path; ``resnet18`` (BatchNorm buffers) falls back to a per-model :func:`train_one` loop.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raysys import architectures
from raysys.config import RaysysError
from raysys.datasets import ImageData
from raysys.train import EVAL_BATCH, EpochCallback, ModelSpec, dropout_mask, initial_model, make_generators, train_one

# The forward pass of each chain architecture, op by op, exactly as its nn.Module runs it.
_CNN_S = ["conv1", "pool", "act", "drop", "conv2", "pool", "act", "drop", "conv3", "act", "drop",
          "flatten", "fc1", "act", "drop", "fc2"]
_CNN_M = ["conv1", "pool", "act", "drop", "conv2", "pool", "act", "drop", "conv3", "pool", "act", "drop",
          "flatten", "fc1", "act", "drop", "fc2"]
CHAINS: dict[str, list[str]] = {
    "tetris_ffn": ["flatten", "fc1", "act", "drop", "fc2"],
    "cnn_s": _CNN_S,
    "cnn_m": _CNN_M,
}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
# Largest first-layer activation (models x images x Ho*Wo*O floats) one evaluation chunk may hold.
# On CPU a chunk that stays in cache for the pool and activation after the GEMM evaluates 1.6x
# faster than one chunk of 1,024 images (measured: 0.71 s vs 1.15 s for 24 CNN-s models on digits).
EVAL_CHUNK_FLOATS = {"cpu": 2 << 20, "cuda": 512 << 20}
# Largest first-layer conv output (floats) one training slice of _ConvPool may hold: 2.5 MB, five
# images of 24 CNN-s models, close enough to the core for pooling and the weight gradient while
# oneDNN gets enough images per call (measured, 24 models: 6.9 ms a step against 7.3 ms with
# two-image slices and 7.4 ms with one slice of ten). On a GPU one slice is fastest.
TRAIN_SLICE_FLOATS = {"cpu": 640 << 10, "cuda": 1 << 40}
EVAL_SLICE_FLOATS = {"cpu": 256 << 10, "cuda": 1 << 40}
# ... and the pooled output of one evaluation chunk (the input of the rest of the chain): ~150
# images of 24 CNN-s models, where conv2 runs 5 % faster than on chunks of 18 (measured).
EVAL_POOLED_CHUNK_FLOATS = {"cpu": 4 << 20, "cuda": 128 << 20}


class PopulationError(RaysysError):
    pass


def train_population(arch: str, specs: Sequence[ModelSpec], data: ImageData, epochs: int,
                     on_epoch: EpochCallback | None = None, device: str = "cpu",
                     init_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Train ``specs`` (one shared :meth:`ModelSpec.population_key`) together; return final weights [N, P].

    ``on_epoch(epoch, weights [N, P] float32 CPU, metrics {name: [N]})`` is called for epoch 0
    (the initial weights) and after every epoch, with exactly what :func:`train_one` reports.
    ``init_weights`` ([N, P], canonical layout) replaces each spec's initialization (fine-tuning).
    """
    specs = list(specs)
    layout = _check(arch, specs, data, epochs, init_weights)
    if arch not in CHAINS:
        return _train_one_by_one(arch, specs, data, epochs, on_epoch, init_weights)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PopulationError(f"device '{device}' was requested but no CUDA GPU is visible. Pass device='cpu'.")
    return _ChainPopulation(arch, layout, specs, data, dev, init_weights).fit(epochs, on_epoch)


def _check(arch, specs, data, epochs, init_weights) -> architectures.Layout:
    if not specs:
        raise PopulationError("train_population got no models. Pass at least one ModelSpec.")
    keys = {s.population_key() for s in specs}
    if len(keys) != 1:
        raise PopulationError(
            f"models in one population must share (activation, optimizer, dropout, batch_size); got {sorted(keys)}. "
            f"Group the specs by ModelSpec.population_key() and train each group as its own population.")
    spec = specs[0]
    if spec.optimizer not in ("adam", "sgd"):
        raise PopulationError(f"unknown optimizer '{spec.optimizer}'. Choose adam or sgd.")
    if spec.activation not in architectures.ACTIVATIONS:
        raise PopulationError(f"unknown activation '{spec.activation}'. Choose one of: {', '.join(architectures.ACTIVATIONS)}.")
    if not 0.0 <= spec.dropout < 1.0:
        raise PopulationError(f"dropout must be in [0, 1), got {spec.dropout}. Fix the spec's dropout.")
    if spec.batch_size < 1:
        raise PopulationError(f"batch_size must be >= 1, got {spec.batch_size}.")
    if epochs < 0:
        raise PopulationError(f"epochs must be >= 0, got {epochs}.")
    layout = architectures.layout_of(arch, data.in_channels, data.num_classes)
    if init_weights is not None and tuple(init_weights.shape) != (len(specs), layout.num_params):
        raise PopulationError(
            f"init_weights has shape {tuple(init_weights.shape)} but the population needs "
            f"({len(specs)}, {layout.num_params}): one row per spec in the canonical layout of {arch} "
            f"on {data.in_channels}-channel data with {data.num_classes} classes.")
    return layout


# --- kernels ---------------------------------------------------------------------------------

class _Tanh(torch.autograd.Function):
    """tanh(x) as 2*sigmoid(2x) - 1 (within 2e-7 of torch.tanh), backward by torch's tanh_backward."""

    @staticmethod
    def forward(ctx, x):
        y = x.mul(2).sigmoid_().mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return _Tanh.apply(x) if x.device.type == "cpu" else torch.tanh(x)


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place tanh (evaluation): no fresh memory to fault in."""
    return torch.tanh_(x) if x.device.type != "cpu" else x.mul_(2).sigmoid_().mul_(2).sub_(1)


def _models_per_group(models: int, out_channels: int, device: torch.device) -> int:
    """How many models share one oneDNN group of a first conv with ``out_channels`` per model.

    oneDNN's CPU kernels vectorize a group's output channels 16 at a time, so a group of 8 costs
    as much as one of 16: two models per group with block-diagonal kernels (zeros between the
    models) do both for the price of one (measured, 24 CNN-s models, two images: forward
    188 -> 157 us, weight gradient 176 -> 162 us). The zeros only ever multiply image pixels,
    which are finite, so no model's output or gradient sees another model's numbers.
    """
    k = 16 // out_channels if device.type == "cpu" and out_channels < 16 and 16 % out_channels == 0 else 1
    return k if k > 1 and models % k == 0 else 1


class _ConvPool(torch.autograd.Function):
    """max_pool2d(conv2d(x, w, b, groups=N), 2) for input images x (no input gradient), one slice of
    images at a time, so each slice's conv output stays in cache; ``k`` models share one oneDNN
    group (:func:`_models_per_group`). The bias gradient is the sum of the pooled gradient: max
    pooling without overlap routes each pooled gradient to exactly one conv output, and summing
    it here costs a fraction of oneDNN's bias reduction over the 4x larger conv gradient."""

    @staticmethod
    def forward(ctx, x, w, b, models: int, k: int, slice_images: int):
        c, kh, kw = w.shape[1:]
        wk = w if k == 1 else _to_blocks(w, models, k)
        ho, wo = x.shape[2] - kh + 1, x.shape[3] - kw + 1
        pooled = torch.empty((x.shape[0], w.shape[0], ho // 2, wo // 2), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)
        indices = torch.empty(pooled.shape, dtype=torch.int64, device=x.device, memory_format=torch.channels_last)
        for i in range(0, x.shape[0], slice_images):
            torch.ops.aten.max_pool2d_with_indices.out(
                F.conv2d(x[i:i + slice_images], wk, b, groups=models // k), [2, 2], [2, 2], [0, 0], [1, 1], False,
                out=pooled[i:i + slice_images], indices=indices[i:i + slice_images])
        ctx.save_for_backward(x, wk, indices)
        ctx.models, ctx.k, ctx.c, ctx.slice_images, ctx.has_bias, ctx.conv_hw = models, k, c, slice_images, b is not None, (ho, wo)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        x, wk, indices = ctx.saved_tensors
        step, grad_wk, grad_conv = ctx.slice_images, None, None
        for i in range(0, x.shape[0], step):
            xs = x[i:i + step]
            if grad_conv is None or grad_conv.shape[0] != xs.shape[0]:  # one buffer, reused while it stays hot
                grad_conv = torch.empty((xs.shape[0], wk.shape[0], *ctx.conv_hw), dtype=x.dtype, device=x.device,
                                        memory_format=torch.channels_last)
            torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                grad_pooled[i:i + step], grad_conv, [2, 2], [2, 2], [0, 0], [1, 1], False, indices[i:i + step],
                grad_input=grad_conv)
            _, gw, _ = torch.ops.aten.convolution_backward(
                grad_conv, xs, wk, None, [1, 1], [0, 0], [1, 1], False, [0, 0], ctx.models // ctx.k,
                [False, True, False])
            grad_wk = gw if grad_wk is None else grad_wk.add_(gw)
        grad_w = grad_wk if ctx.k == 1 else _from_blocks(grad_wk, ctx.models, ctx.k, ctx.c)
        grad_b = grad_pooled.sum((0, 2, 3)) if ctx.has_bias else None
        return None, grad_w, grad_b, None, None, None


def _to_blocks(w: torch.Tensor, models: int, k: int) -> torch.Tensor:
    """Kernels [N*O, C, kh, kw] of N models -> [N*O, k*C, kh, kw]: oneDNN groups of k models, each
    model's kernels on its own input channels, zeros on the other models' channels."""
    o = w.shape[0] // models
    c, kh, kw = w.shape[1:]
    blocks = w.new_zeros(models // k, k, o, k, c, kh, kw)
    blocks.diagonal(0, 1, 3).copy_(w.view(models // k, k, o, c, kh, kw).permute(0, 2, 3, 4, 5, 1))
    return blocks.view(models * o, k * c, kh, kw)


def _from_blocks(g: torch.Tensor, models: int, k: int, c: int) -> torch.Tensor:
    """The inverse of :func:`_to_blocks` on a gradient: each model's own block; the rest is discarded."""
    o, kh, kw = g.shape[0] // models, g.shape[2], g.shape[3]
    diagonal = g.view(models // k, k, o, k, c, kh, kw).diagonal(0, 1, 3)  # [G, O, C, kh, kw, k]
    return diagonal.permute(0, 5, 1, 2, 3, 4).reshape(models * o, c, kh, kw)


class _GroupedConv(torch.autograd.Function):
    """conv2d(x, w, b, groups) whose bias gradient is a plain sum: oneDNN's own bias reduction inside
    the backward costs 10-35 % of the whole convolution backward here (measured on CNN-s)."""

    @staticmethod
    def forward(ctx, x, w, b, groups: int):
        ctx.save_for_backward(x, w)
        ctx.groups, ctx.has_bias = groups, b is not None
        return F.conv2d(x, w, b, groups=groups)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], ctx.groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


# --- the batched chain ----------------------------------------------------------------------

_ACT = {"tanh": _tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "gelu": F.gelu}
# In evaluation (no autograd) an activation's input is always a fresh intermediate of the chain
# (a pool, conv or linear output, or a buffer of the evaluation's own), so it is overwritten.
_ACT_INPLACE = {"tanh": _tanh_, "sigmoid": torch.sigmoid_, "relu": torch.relu_, "gelu": F.gelu}
_PARAMETER_FREE = ("flatten", "pool", "act", "drop")


class _ChainPopulation:
    """N models of one chain architecture; activations are [B, N*C, H, W] (conv) or [N, B, F] (linear)."""

    def __init__(self, arch: str, layout: architectures.Layout, specs: list[ModelSpec], data: ImageData,
                 device: torch.device, init_weights: torch.Tensor | None):
        self.arch, self.layout, self.specs, self.device = arch, layout, specs, device
        spec = specs[0]
        self.act, self.p_drop, self.batch_size, self.optimizer = _ACT[spec.activation], spec.dropout, spec.batch_size, spec.optimizer
        self.act_ = _ACT_INPLACE[spec.activation]
        self.chain = CHAINS[arch]
        self.n = n = len(specs)
        if init_weights is None:
            init_weights = torch.stack([architectures.flatten(initial_model(arch, s, data)) for s in specs])
        self.weights = init_weights.detach().to(device=device, dtype=torch.float32).clone()
        self.lr = torch.tensor([s.lr for s in specs], dtype=torch.float32, device=device)[:, None]
        self.wd = torch.tensor([s.weight_decay for s in specs], dtype=torch.float32, device=device)[:, None]
        self.gens = [make_generators(s.seed) for s in specs]
        self.m = torch.zeros_like(self.weights)
        self.v = torch.zeros_like(self.weights)
        self.adam_scratch = torch.empty_like(self.weights)
        self.has_wd = bool((self.wd != 0).any())
        self.step_count = 0
        # Each tensor's view of the flat weights is its own autograd leaf, made once: Adam updates
        # the flat tensor in place, and gradients come back per tensor, joined by one cat (rather
        # than autograd zero-filling an [N, P] buffer per tensor to add it in).
        self.leaves = {name: t.requires_grad_(True) for name, t in architectures.split_vector(self.weights, layout).items()}
        assert all(t.untyped_storage().data_ptr() == self.weights.untyped_storage().data_ptr() for t in self.leaves.values())

        self.images = {s: data.split(s)[0].to(device) for s in ("train", "val", "test")}
        self.labels = {s: data.split(s)[1].to(device) for s in ("train", "val", "test")}
        self.first = next(op for op in self.chain if op not in _PARAMETER_FREE)
        self.first_index = self.chain.index(self.first)
        w = layout.tensor(f"{self.first}.weight").shape
        self.first_kernel = tuple(w[2:]) if len(w) == 4 else None
        self.first_bias = f"{self.first}.bias" in {t.name for t in layout.tensors}
        # In training a first conv followed by pooling runs fused (_ConvPool), pooling included.
        self.pooled_first = self.first_kernel is not None and self.chain[self.first_index + 1:self.first_index + 2] == ["pool"]
        self.models_per_group = _models_per_group(n, w[0], device) if self.pooled_first else 1
        self.site_shapes = self._trace_shapes(tuple(data.x_train.shape[1:]))

    def _trace_shapes(self, shape) -> dict[int, tuple]:
        """Per dropout op index: the NCHW shape (without batch) train_one's hook sees."""
        shapes, cur = {}, shape
        for i, op in enumerate(self.chain):
            if op == "pool":
                cur = (cur[0], cur[1] // 2, cur[2] // 2)
            elif op == "drop":
                shapes[i] = cur
            elif op == "flatten":
                cur = (math.prod(cur),)
            elif op != "act":
                w = self.layout.tensor(f"{op}.weight").shape
                cur = (w[0], cur[1] - w[2] + 1, cur[2] - w[3] + 1) if len(w) == 4 else (w[0],)
        return shapes

    # --- forward ---------------------------------------------------------------------------

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None,
                 start: int) -> torch.Tensor:
        """Run the chain from op ``start`` on; x is the output of the op before it. Returns logits [N, B, K]."""
        n, site = self.n, 0
        for op in self.chain[start:]:
            if op == "pool":
                x = F.max_pool2d(x, 2)  # torch's own kernel: its tie-breaking and NaN rules
            elif op == "act":
                x = self.act(x) if torch.is_grad_enabled() else self.act_(x)
            elif op == "drop":
                if masks is not None:
                    x = x * masks[site]
                site += 1
            elif op == "flatten":  # [B, N*C, H, W] -> [N, B, C*H*W], torch's (C, H, W) order
                x = x.reshape(x.shape[0], n, -1).transpose(0, 1)
            else:
                w, b = params[f"{op}.weight"], params.get(f"{op}.bias")
                if w.dim() == 5:  # grouped convolution: group i is model i
                    w, b = w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1)
                    if x.device.type == "cpu" and torch.is_grad_enabled():
                        x = _GroupedConv.apply(x, w, b, n)
                    else:
                        x = F.conv2d(x, w, b, groups=n)
                else:
                    wt = w.transpose(1, 2)
                    x = torch.bmm(x, wt) if b is None else torch.baddbmm(b[:, None, :], x, wt)
        return x

    def _kernel(self) -> tuple[int, ...]:
        """The first conv's kernel size (the im2col paths exist only for a first conv)."""
        if self.first_kernel is None:
            raise RaysysError("this architecture's first layer is not a conv; the first-conv GEMM path does not apply")
        return self.first_kernel

    def _conv_rows(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Images [M, C, H, W] -> first-conv im2col rows [M, Ho*Wo, C*kh*kw (+1)], with a column of
        ones when the layer has a bias, so the bias rides inside the GEMM. The rows are copied once,
        straight from a strided view of the images (unfold + cat + transpose took three passes),
        into ``out`` when given: a buffer from an earlier call whose ones column is already set."""
        m, c, h, w = x.shape
        kh, kw = self._kernel()
        ho, wo, k = h - kh + 1, w - kw + 1, c * kh * kw
        x = x.contiguous()
        patches = x.as_strided((m, ho, wo, c, kh, kw), (c * h * w, w, 1, h * w, w, 1), x.storage_offset())
        width = k + self.first_bias
        if out is not None and out.shape[0] >= m:
            rows, fresh = out[:m], False
        else:
            rows, fresh = x.new_empty(m, ho * wo, width), True
        rows.view(m, ho, wo, width)[..., :k].view(m, ho, wo, c, kh, kw).copy_(patches)
        if self.first_bias and fresh:
            rows[..., k] = 1.0
        return rows

    def _first_layer(self, params, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """The first weight layer.

        Per-model batches (``shared`` False): x is [N, B, F] for a linear layer, or for a conv the
        images [B, N*C, H, W] in channels-last memory (group i = model i's images), the layout in
        which CPU grouped convolutions and pooling are fastest; a conv followed by pooling
        (``pooled_first``) returns the POOLED output (:class:`_ConvPool`).
        Images every model sees (``shared``, evaluation): x is [M, F], or for a conv its im2col
        rows [M, Ho*Wo, K], and the layer is ONE GEMM against all models' weights side by side.
        """
        w, b = params[f"{self.first}.weight"], params.get(f"{self.first}.bias")
        n, o = w.shape[:2]
        if self.first_kernel is None:
            wt = w.transpose(1, 2)
            if shared:  # [M, F] @ [F, N*O]
                y = (x @ wt.transpose(0, 1).reshape(x.shape[1], n * o)).view(-1, n, o).transpose(0, 1)
                return y if b is None else y + b[:, None, :]
            return torch.bmm(x, wt) if b is None else torch.baddbmm(b[:, None, :], x, wt)
        if not shared:
            w, b = w.reshape(n * o, *w.shape[2:]), None if b is None else b.reshape(-1)
            if self.pooled_first:
                per_image = n * o * (x.shape[2] - w.shape[2] + 1) * (x.shape[3] - w.shape[3] + 1)
                slice_images = max(1, TRAIN_SLICE_FLOATS.get(self.device.type, 1 << 40) // per_image)
                return _ConvPool.apply(x, w, b, n, self.models_per_group, slice_images)
            return F.conv2d(x, w, b, groups=n)
        w = self._conv_gemm_weights(params)
        m, side = x.shape[0], int(round(math.sqrt(x.shape[1])))
        y = (x.reshape(-1, w.shape[0]) @ w).view(m, side, side, n * o)
        return y.permute(0, 3, 1, 2)  # [M, N*O, Ho, Wo], channels-last memory

    def _conv_gemm_weights(self, params) -> torch.Tensor:
        """All models' first-conv kernels side by side, [K (+1 bias row), N*O], for the shared-image GEMM."""
        w, b = params[f"{self.first}.weight"], params.get(f"{self.first}.bias")
        n, o = w.shape[:2]
        w = w.reshape(n, o, -1)
        if b is not None:
            w = torch.cat([w, b[:, :, None]], dim=2)  # matches the rows' column of ones
        return w.reshape(n * o, -1).t()

    def _train_inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """First-layer inputs of the per-model batches idx [N, b] (see :meth:`_first_layer`)."""
        x = self.images["train"]
        if self.first_kernel is None:
            return x.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
        x = x.index_select(0, idx.t().reshape(-1))  # image-major: j*N + i is model i's j-th image
        return x.view(idx.shape[1], -1, *x.shape[2:]).contiguous(memory_format=torch.channels_last)

    # --- training --------------------------------------------------------------------------

    def _masks(self, b: int) -> list[torch.Tensor] | None:
        """train_one's dropout masks, drawn per model from its own generator in forward order."""
        if self.p_drop <= 0:
            return None
        per_model = [[dropout_mask((b, *self.site_shapes[i]), self.p_drop, g[2]) for i in sorted(self.site_shapes)]
                     for g in self.gens]
        masks = []
        for k, i in enumerate(sorted(self.site_shapes)):
            shape = self.site_shapes[i]
            if len(shape) == 3:  # [b, N*C, H, W]
                m = torch.stack([pm[k] for pm in per_model], 1).view(b, -1, shape[1], shape[2])
                m = m.contiguous(memory_format=torch.channels_last)
            else:  # [N, b, F]
                m = torch.stack([pm[k] for pm in per_model])
            masks.append(m.to(self.device, non_blocking=True))
        return masks

    def _step(self, idx: torch.Tensor) -> None:
        params = self.leaves
        start = self.first_index + (2 if self.pooled_first else 1)
        logits = self._forward(params, self._first_layer(params, self._train_inputs(idx), False), self._masks(idx.shape[1]), start)
        n, b, k = logits.shape
        y = self.labels["train"][idx]
        # Each model's loss is the mean over its own batch; summing only seeds backward, so every
        # model gets the gradient of its own loss and a NaN stays in its own rows.
        loss = F.cross_entropy(logits.reshape(n * b, k), y.reshape(-1), reduction="sum") / b
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            self._update(self.weights, architectures.join_tensors(dict(zip(params, grads)), self.layout))

    def _update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """torch.optim.Adam / SGD (L2 weight decay added to the gradient), per-model lr and wd."""
        if self.has_wd:
            grad.addcmul_(self.wd, p)  # grad is this step's own tensor
        self.step_count += 1
        if self.optimizer == "sgd":
            p.addcmul_(self.lr, grad, value=-1.0)
            return
        beta1, beta2 = ADAM_BETAS
        self.m.lerp_(grad, 1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - beta2 ** self.step_count)
        step = torch.sqrt(self.v, out=self.adam_scratch).div_(bias2_sqrt).add_(ADAM_EPS)  # denominator
        torch.div(self.m, step, out=step)
        p.addcmul_(self.lr, step, value=-1.0 / bias1)

    @torch.no_grad()
    def evaluate(self) -> dict[str, np.ndarray]:
        """All models on every split; the images of a chunk are shared, so the first layer is one batched GEMM."""
        params = architectures.split_vector(self.weights, self.layout)
        n = self.n
        x0 = self.images["train"]
        per_image = self.layout.tensor(f"{self.first}.weight").shape[0] * n
        if self.first_kernel is not None:
            per_image *= (x0.shape[2] - self.first_kernel[0] + 1) * (x0.shape[3] - self.first_kernel[1] + 1)
        if self.pooled_first:  # the first layer's output is pooled slice by slice: a chunk holds a quarter of it
            chunk = max(1, min(EVAL_BATCH, EVAL_POOLED_CHUNK_FLOATS.get(self.device.type, 1 << 40) // (per_image // 4)))
            first = self._pooled_first_layer(params, per_image, chunk)
        else:
            chunk = max(1, min(EVAL_BATCH, EVAL_CHUNK_FLOATS.get(self.device.type, 24 << 20) // per_image))
        out = {}
        for split in ("train", "val", "test"):
            x, y = self.images[split], self.labels[split]
            loss_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
            correct = torch.zeros(n, dtype=torch.int64, device=self.device)
            for i in range(0, len(x), chunk):
                xs, ys = x[i:i + chunk], y[i:i + chunk]
                if self.pooled_first:
                    logits = self._forward(params, first(xs), None, self.first_index + 2)
                else:
                    rows = xs.reshape(len(xs), -1) if self.first_kernel is None else self._conv_rows(xs)
                    logits = self._forward(params, self._first_layer(params, rows, True), None, self.first_index + 1)
                m, k = logits.shape[1:]
                loss = F.cross_entropy(logits.reshape(n * m, k), ys.repeat(n), reduction="none").view(n, m)
                loss_sum += loss.sum(1, dtype=torch.float64)
                correct += (logits.argmax(-1) == ys).sum(1)
            out[f"{split}_loss"] = (loss_sum / len(x)).cpu().numpy()
            out[f"{split}_acc"] = (correct.double() / len(x)).cpu().numpy()
        out["ggap"] = out["train_acc"] - out["test_acc"]
        return out

    def _pooled_first_layer(self, params, per_image: int, max_images: int):
        """Evaluation's first conv + max-pool for images every model sees: returns images -> pooled
        [M <= max_images, N*O, Ho/2, Wo/2]. The GEMM runs a few images at a time into one reused buffer,
        so each slice's output is still in cache when it is pooled, and no large tensor is allocated."""
        w = self._conv_gemm_weights(params).contiguous()
        n_o = w.shape[1]
        step = max(1, min(max_images, EVAL_SLICE_FLOATS.get(self.device.type, 1 << 40) // per_image))
        x0 = self.images["train"]
        kernel = self._kernel()
        ho, wo = x0.shape[2] - kernel[0] + 1, x0.shape[3] - kernel[1] + 1
        buffer = torch.empty(step * ho * wo, n_o, device=self.device)

        buffers: dict[str, torch.Tensor] = {}  # the largest rows / pooled output so far, reused (fresh memory costs page faults)
        indices = torch.empty((step, n_o, ho // 2, wo // 2), dtype=torch.int64, device=self.device,
                              memory_format=torch.channels_last)

        def first(images: torch.Tensor) -> torch.Tensor:
            m = len(images)
            rows = self._conv_rows(images, buffers.get("rows"))
            if m > len(buffers.get("rows", ())):
                buffers["rows"] = rows
                buffers["pooled"] = torch.empty((m, n_o, ho // 2, wo // 2), device=self.device,
                                                memory_format=torch.channels_last)
            pooled = buffers["pooled"][:m]
            for i in range(0, m, step):
                r = rows[i:i + step]
                y = torch.mm(r.reshape(-1, r.shape[2]), w, out=buffer[:r.shape[0] * ho * wo])
                torch.ops.aten.max_pool2d_with_indices.out(
                    y.view(r.shape[0], ho, wo, n_o).permute(0, 3, 1, 2), [2, 2], [2, 2], [0, 0], [1, 1], False,
                    out=pooled[i:i + step], indices=indices[:r.shape[0]])
            return pooled
        return first

    def fit(self, epochs: int, on_epoch: EpochCallback | None) -> torch.Tensor:
        def report(epoch):
            if on_epoch is not None:
                on_epoch(epoch, self.weights.to("cpu", torch.float32, copy=True), self.evaluate())

        report(0)
        n_train = self.images["train"].shape[0]
        for epoch in range(1, epochs + 1):
            order = torch.stack([torch.randperm(n_train, generator=g[1]) for g in self.gens]).to(self.device)
            for i in range(0, n_train, self.batch_size):
                self._step(order[:, i:i + self.batch_size])
            report(epoch)
        return self.weights.to("cpu", torch.float32, copy=True)


# --- fallback ---------------------------------------------------------------------------------

def _train_one_by_one(arch, specs, data, epochs, on_epoch, init_weights) -> torch.Tensor:
    """Architectures with buffers (BatchNorm): train_one per model, reports gathered per epoch (all of them in
    memory until the last model is done; one model's are reported as they come, which is how ``zoo generate``
    streams these architectures' shards)."""
    per_epoch: list[list] = [[] for _ in range(epochs + 1)]
    finals = []
    for i, spec in enumerate(specs):
        model = None
        if init_weights is not None:
            model = architectures.build(arch, spec.activation, spec.dropout, data.in_channels, data.num_classes)
            architectures.unflatten(init_weights[i].detach().cpu(), model)
        collect = None if on_epoch is None else (lambda e, w, m: per_epoch[e].append((w, m)))
        if on_epoch is not None and len(specs) == 1:  # nothing to gather: each epoch reported as it ends
            collect = on_epoch
        model = train_one(arch, spec, data, epochs, collect, model=model)
        finals.append(architectures.flatten(model))
    if on_epoch is not None and len(specs) > 1:
        for epoch, items in enumerate(per_epoch):
            weights = torch.cat([w for w, _ in items])
            metrics = {k: np.concatenate([m[k] for _, m in items]) for k in items[0][1]}
            on_epoch(epoch, weights, metrics)
    return torch.stack(finals)
