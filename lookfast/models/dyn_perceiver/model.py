"""Dyn-Perceiver (Han et al., ICCV 2023): a CNN feature branch and a latent branch joined by cross-attention, with
four exits. Same module names, shapes and math as the official `DynPerceiver` classes, in plain torch.

The forward is written as four consecutive pieces, one per exit, so early exiting can run later pieces on the
surviving samples only:

    forward_exit1(images)      -> state1 = (x, z, y1)   stem, CNN stages 1-2, latent stages 1-3, exit 1
    forward_exit2(x, z, y1)    -> state2 = (x, z, y2)   CNN stage 3, latent stage 4, exit 2 (uses y1)
    forward_exit3(x)           -> (x, y3)               CNN stage 4, CNN head
    forward_exit4(x, z, y2)    -> y4                    final z->x, merged head (uses y2)

x: CNN features (B, C, H, W); z: latent tokens (B, L, C_z); y_i: (B, num_classes) logits.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import mobilenetv3, regnet, resnet
from .derived import derived
from .layers import SqueezeExcitation, global_avg_pool, onednn_dtype
from .perceiver import CrossAttentionLayer, MultiHeadAttention, SelfAttentionBlock, layernorm_linear

POOLED = 7  # x->z keys: the features pooled to 7 x 7 = 49 tokens ("spatial_reduction")


def _dwc_plus_identity(dwc: nn.Conv2d) -> torch.Tensor:
    """The depthwise 7x7 weight with its centre tap raised by 1 (dwc(x) + x as one conv), cached (derived.py)."""

    def build():
        w = dwc.weight.clone()
        w[:, :, 3, 3] += 1
        return w

    return derived(dwc, "plus_identity", [dwc.weight], dwc.weight.dtype, build)


def _dwc_pooled(dwc: nn.Conv2d, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor | None:
    """adaptive_avg_pool2d(dwc(x) + x, 7) as one strided depthwise conv, or None where that does not apply.

    Why: the x->z keys only need the 7x7 window means of dwc(x) + x. Both steps are linear, so when the map divides
    into 7 x 7 equal windows (sh = H/7, sw = W/7) the pair is one depthwise conv with stride (sh, sw), the same
    zero padding, and kernel (7 + sh - 1) x (7 + sw - 1) = the 7x7 weight (centre tap + 1) correlated with an
    sh x sw box of 1/(sh*sw). It computes 49 outputs per channel instead of H*W and never writes the full-size
    dwc output (bf16, 1 thread, B 16 at 112x112, 32 channels: ~12 -> ~2.3 ms). Used for 16-bit compute only, where
    the rounding it changes (the kernel rounded once to `dt` instead of the H x W dwc outputs rounded to `dt` before
    pooling) is of the same size; float32 / float64 keep the two-step math unchanged."""
    if dt not in (torch.bfloat16, torch.float16) or x.dim() != 4:
        return None
    h, w = x.shape[-2:]
    if (h % POOLED or w % POOLED or dwc.kernel_size != (7, 7) or dwc.stride != (1, 1) or dwc.padding != (3, 3)
            or dwc.dilation != (1, 1) or dwc.groups != dwc.in_channels or dwc.padding_mode != "zeros"):
        return None
    sh, sw = h // POOLED, w // POOLED
    c = dwc.out_channels

    def build():
        # Built in float64 (a few thousand numbers), rounded once to dt.
        k = dwc.weight.detach().double().clone()
        k[:, :, 3, 3] += 1
        box = torch.full((c, 1, sh, sw), 1.0 / (sh * sw), dtype=torch.float64, device=k.device)
        k = F.conv2d(F.pad(k.view(1, c, 7, 7), (sw - 1, sw - 1, sh - 1, sh - 1)), box, groups=c)  # box: no flip
        bias = None if dwc.bias is None else dwc.bias.detach().to(dt)
        return k.view(c, 1, 6 + sh, 6 + sw).to(dt), bias

    sources = [dwc.weight] if dwc.bias is None else [dwc.weight, dwc.bias]
    weight, bias = derived(dwc, f"pooled_{sh}x{sw}", sources, dt, build)
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(x.to(dt), weight, bias, (sh, sw), 3, 1, c)


def family_of(cnn_arch: str) -> str:
    if cnn_arch in regnet.REGNET_Y:
        return "regnet"
    if cnn_arch in resnet.RESNETS:
        return "resnet"
    if cnn_arch in mobilenetv3.WIDTHS:
        return "mobilenet"
    raise ValueError(f"unknown cnn_arch {cnn_arch!r}")


class DynPerceiver(nn.Module):
    """The Dyn-Perceiver classifier. Constructor arguments as the official one (README defaults); `ops` picks the
    attention implementation: "reference" (plain PyTorch, the official math) or "fused" (lookfast ops)."""

    def __init__(
        self,
        cnn_arch: str,
        num_latents: int,
        num_classes: int = 1000,
        input_size: int = 224,
        num_SA_heads: tuple[int, ...] | list[int] | None = (1, 2, 4, 8),
        num_latent_channels: int | None = None,
        dropout: float = 0.0,
        SA_widening_factor: int = 4,
        spatial_reduction: bool = True,
        depth_factor: tuple[int, ...] | list[int] = (1, 1, 1, 1),
        with_x2z: bool = True,
        with_z2x: bool = True,
        with_dwc: bool = True,
        with_last_CA: bool = True,
        with_isc: bool = True,
        ops: str = "reference",
    ):
        super().__init__()
        if not spatial_reduction:
            # The official forward pools with `ca_pooling`, which only exists with spatial_reduction=True.
            raise NotImplementedError("spatial_reduction=False cannot run in the official code either")
        if dropout:
            raise NotImplementedError("attention dropout is a training option; this model is for inference")
        if ops not in ("reference", "fused"):
            raise ValueError(f"ops must be 'reference' or 'fused', got {ops!r}")
        heads = list(num_SA_heads) if num_SA_heads is not None else [1, 2, 4, 8]
        self.cnn_arch, self.family = cnn_arch, family_of(cnn_arch)
        self.num_classes, self.input_size = num_classes, input_size
        self.with_x2z, self.with_z2x, self.with_dwc = with_x2z, with_z2x, with_dwc
        self.with_last_CA, self.with_isc = with_last_CA, with_isc

        merge_hidden = None
        if self.family == "mobilenet":
            stem, stages, c_in, c_out, classifier_cnn, merge_hidden = mobilenetv3.build(cnn_arch, num_classes)
        else:
            stem, stages, c_in, c_out, classifier_cnn = (regnet if self.family == "regnet" else resnet).build(
                cnn_arch, num_classes)
        self.z_channels, self.cnn_channels = list(c_in), c_out
        latent_channels = c_in[0] if num_latent_channels is None else num_latent_channels
        layers = [3 * depth_factor[0], 3 * depth_factor[1], 9 * depth_factor[2], 3 * depth_factor[3]]

        # Registration order mirrors the official classes so state_dict() lists keys in the same order.
        self.latent = nn.Parameter(torch.empty(num_latents, latent_channels))
        self.cnn_stem = stem
        if self.family == "regnet":
            self.cnn_body = nn.Sequential(OrderedDict((f"block{i + 1}", s) for i, s in enumerate(stages)))
        else:
            for i, s in enumerate(stages):
                setattr(self, f"cnn_body_stage{i + 1}", s)
        if self.family == "resnet":
            self.classifier_cnn = classifier_cnn

        for i in range(4):
            c = c_in[i]
            if with_dwc and (i == 0 or with_x2z):
                setattr(self, f"dwc{i + 1}_x2z", nn.Conv2d(c, c, 7, 1, 3, groups=c))
            if i == 0 or with_x2z:
                setattr(self, f"cross_att{i + 1}_x2z", CrossAttentionLayer(c, c, key_bias_tokens=POOLED * POOLED))
            if i > 0 and with_z2x:
                setattr(self, f"cross_att{i + 1}_z2x", CrossAttentionLayer(c, c, c // 8, c // 8))
            setattr(self, f"self_att{i + 1}", SelfAttentionBlock(layers[i], heads[i], c, SA_widening_factor))
        self.last_cross_att_z2x = (
            CrossAttentionLayer(c_out, c_in[3], c_out // 8, c_out // 8) if with_last_CA else None)

        if self.family == "regnet":
            self.classifier_cnn = classifier_cnn
        self.early_classifier3 = nn.Linear(c_in[2], num_classes)
        z_out = c_in[3]
        merge_in = c_out + (2 if with_isc else 1) * z_out
        if with_isc:
            self.isc3 = self._isc(num_classes, z_out)
            self.classifier_att = nn.Linear(2 * z_out, num_classes)
            self.isc4 = self._isc(num_classes, z_out)
        else:
            self.classifier_att = nn.Linear(z_out, num_classes)
        if self.family == "mobilenet":
            self.classifier_cnn = classifier_cnn
            self.classifier_merge = nn.Sequential(
                nn.BatchNorm1d(merge_in), nn.Linear(merge_in, merge_hidden), nn.Hardswish(inplace=True),
                nn.Dropout(0.2, inplace=True), nn.Linear(merge_hidden, num_classes))
        else:
            self.classifier_merge = nn.Sequential(nn.BatchNorm1d(merge_in), nn.Linear(merge_in, num_classes))
        tokens = [num_latents // 2 ** i for i in range(4)]
        self.token_expander = nn.ModuleList(layernorm_linear(c_in[i], c_in[i + 1]) for i in range(3))
        self.token_mixer = nn.ModuleList(layernorm_linear(tokens[i], tokens[i + 1]) for i in range(3))
        with torch.no_grad():
            self.latent.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
        self.ops = "reference"
        self.set_ops(ops)

    @staticmethod
    def _isc(num_classes: int, width: int) -> nn.Sequential:
        # "Inter-stage classifier" connection: an exit's logits projected into the next head's input.
        return nn.Sequential(nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))

    def set_ops(self, ops: str) -> "DynPerceiver":
        """Switch between "reference" (plain PyTorch, the official module-by-module math) and "fused": attention
        through `lookfast.cross_attention`, the fused z->x block (fused.py), BatchNorms folded into the convs
        (eval mode), channels-last CNN, exit-1 piece in cache-sized chunks. Weights and state_dict() are unchanged.
        Returns self."""
        if ops not in ("reference", "fused"):
            raise ValueError(f"ops must be 'reference' or 'fused', got {ops!r}")
        self.ops = ops
        # Fused: the CNN runs channels-last, so the z->x blocks read and write pixels as (B*H*W, C) rows in place.
        self.to(memory_format=torch.channels_last if ops == "fused" else torch.contiguous_format)
        for m in self.modules():
            if isinstance(m, (MultiHeadAttention, SqueezeExcitation)):
                m.fused = ops == "fused"
            if hasattr(m, "fold_bn"):  # conv + BatchNorm pairs: one folded conv in fused (inference) mode
                m.fold_bn = ops == "fused"
        return self

    def clear_cached_weights(self) -> "DynPerceiver":
        """Drop the fused path's derived weights (BatchNorm and LayerNorm folds, concatenated projections, casts,
        oneDNN-packed convolutions; `derived.py`), so the next fused call rebuilds them from the parameters.

        They are rebuilt automatically when a parameter is replaced or edited in place through the parameter
        (`.to()`, `load_state_dict`, an optimizer step, `with torch.no_grad(): p.copy_(...)`): PyTorch versions
        those. An edit through `p.data` is not versioned and not seen: call this after one. Returns self."""
        from .derived import clear

        for m in self.modules():
            clear(m)
        return self

    # -- pieces -------------------------------------------------------------------------------------------------
    def cnn_stage(self, i: int) -> nn.Module:
        """CNN stage i (1..4)."""
        return getattr(self.cnn_body, f"block{i}") if self.family == "regnet" else getattr(self, f"cnn_body_stage{i}")

    def _x2z(self, i: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Latents z read the stage-i CNN features x, pooled to 7x7 tokens after a depthwise 7x7 conv + residual."""
        dwc = getattr(self, f"dwc{i}_x2z", None)
        pooled = False  # kv already pooled to 7x7 (fused 16-bit path, _dwc_pooled)
        if dwc is None:
            kv = x
        elif self.ops == "fused":
            from .fused import _compute_dtype

            kv = _dwc_pooled(dwc, x, _compute_dtype(x))
            pooled = kv is not None
            if not pooled:
                # dwc(x) + x is one depthwise conv whose centre tap is raised by 1: no separate add pass.
                kv = F.conv2d(x, _dwc_plus_identity(dwc), dwc.bias, 1, 3, 1, dwc.groups)
        else:
            kv = dwc(x) + x
        if not pooled:
            kv = F.adaptive_avg_pool2d(kv, POOLED)
        kv = kv.flatten(2).transpose(1, 2)
        return getattr(self, f"cross_att{i}_x2z")(z, kv)

    def _z2x(self, layer: CrossAttentionLayer, x: torch.Tensor, z: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """Every pixel of x (B, C, H, W) attends to the latents z; returns updated x (B, C, H, W)."""
        if self.ops == "fused":
            from .fused import z2x_fused

            return z2x_fused(layer, x, z, inplace=owned)
        b, c, h, w = x.shape
        out = layer(x.flatten(2).transpose(1, 2), z)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial mean (B, C, H, W) -> (B, C); fused: without a float32 copy of a bf16 map (layers.global_avg_pool)."""
        return global_avg_pool(x) if self.ops == "fused" else x.mean((2, 3))

    def _mix(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Token mixer i: (B, L, C_i) -> (B, L/2, C_{i+1})."""
        z = self.token_mixer[i](z.transpose(1, 2)).transpose(1, 2)
        return self.token_expander[i](z)

    def _latent_stage(self, i: int, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent work of stage i >= 2, given the CNN output x of stage i-1: mix, z->x, x->z, self-attention."""
        z = self._mix(i - 2, z)
        if self.with_z2x:  # x is a CNN stage's fresh output (see the callers): the block may update it in place
            x = self._z2x(getattr(self, f"cross_att{i}_z2x"), x, z, owned=True)
        if self.with_x2z:
            z = self._x2z(i, x, z)
        return x, getattr(self, f"self_att{i}")(z)

    # Fused mode runs the first piece (full-resolution CNN stages) in chunks of this many images: their activations
    # then stay in cache between the memory-bound ops (measured ~25% faster per image than one B=32 batch on CPU).
    # Later pieces work on small maps and prefer the whole batch. Results do not depend on it (eval mode).
    # The chunk is counted in float32 images; 16-bit activations take half the bytes, so bf16/fp16 (weights or
    # autocast) use chunks twice as long (bf16, B 64, 1 thread: 8 -> 16 images per chunk ~9% faster for this piece).
    exit1_chunk = 8

    def _check_images(self, images) -> None:
        # Refused before any stage runs (nothing half-computed): not a tensor, not (B, 3, H, W) floating point, smaller
        # than the CNN's total stride of 32 (its last feature map would be empty), or holding NaN / inf.
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point (normalised pixels), got {images.dtype}")
        if images.shape[2] < 32 or images.shape[3] < 32:
            raise ValueError(f"images must be at least 32x32 (the CNN's total stride), got "
                             f"{images.shape[2]}x{images.shape[3]}; the model was trained at {self.input_size}")
        from ..checkpoint_io import check_finite_images

        check_finite_images(images)

    def forward_exit1(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (x (B, C3, H/16, W/16) ready for CNN stage 3, z (B, L/4, C3), y1 (B, classes)).

        Raises TypeError/ValueError for images that are not (B, 3, H >= 32, W >= 32) floating point, or hold NaN/inf."""
        self._check_images(images)
        if self.ops == "fused":
            dev = images.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.latent.dtype
            # Under bf16 autocast float32 images would be copied twice (to channels-last here, to bf16 in the stem
            # conv); one conversion does both. Same values: the stem's first op casts them to bf16 anyway.
            to = dt if onednn_dtype(images) == dt and images.dtype != dt else images.dtype
            images = images.to(to, memory_format=torch.channels_last)
            chunk = self.exit1_chunk * (2 if dt in (torch.bfloat16, torch.float16) else 1)
            if images.shape[0] > chunk and not torch.compiler.is_compiling():
                parts = [self._exit1(c) for c in images.split(chunk)]
                return tuple(torch.cat(p) for p in zip(*parts))
        return self._exit1(images)

    def _exit1(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.latent.unsqueeze(0).expand(images.shape[0], -1, -1)
        x = self.cnn_stem(images)
        z = self.self_att1(self._x2z(1, x, z))
        x = self.cnn_stage(1)(x)
        x, z = self._latent_stage(2, x, z)
        x = self.cnn_stage(2)(x)
        x, z = self._latent_stage(3, x, z)
        return x, z, self.early_classifier3(z.mean(1))

    def forward_exit2(self, x: torch.Tensor, z: torch.Tensor, y1: torch.Tensor):
        """-> (x ready for CNN stage 4, z (B, L/8, C4), y2)."""
        x = self.cnn_stage(3)(x)
        x, z = self._latent_stage(4, x, z)
        zm = z.mean(1)
        y2 = self.classifier_att(torch.cat((zm, self.isc3(y1)), 1) if self.with_isc else zm)
        return x, z, y2

    def forward_exit3(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x after CNN stage 4, y3 from the CNN head)."""
        x = self.cnn_stage(4)(x)
        return x, self.classifier_cnn(self._pool(x))

    def forward_exit4(self, x: torch.Tensor, z: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """The merged head: pooled features after a final z->x, mean latent, and (isc) a projection of y2."""
        if self.last_cross_att_z2x is not None:
            x = self._z2x(self.last_cross_att_z2x, x, z)
        parts = [self._pool(x), z.mean(1)]
        if self.with_isc:
            parts.append(self.isc4(y2))
        return self.classifier_merge(torch.cat(parts, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> the four exits' logits (y1, y2, y3, y4), each (B, num_classes)."""
        x, z, y1 = self.forward_exit1(images)
        x, z, y2 = self.forward_exit2(x, z, y1)
        x, y3 = self.forward_exit3(x)
        return y1, y2, y3, self.forward_exit4(x, z, y2)

    def exit_macs(self, input_size: int | None = None) -> list[int]:
        """Cumulative multiply-accumulates per image at exits 1..4 (counted with hooks at `input_size`, default the
        model's input_size, 224)."""
        from .macs import exit_macs

        return exit_macs(self, input_size)

    def forward_early_exit(self, images: torch.Tensor, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit-masked inference. images (B, 3, H, W); thresholds: 4 max-softmax thresholds (the last is ignored:
        every sample still running takes exit 4), e.g. from `lookfast.calibrate_thresholds`. Returns (logits
        (B, num_classes), exit_index (B,) int64 in 0..3); later stages run on the surviving samples only, and each
        sample's logits are the full model's logits at the exit it took."""
        from .exit_stages import forward_early_exit

        return forward_early_exit(self, images, thresholds)
