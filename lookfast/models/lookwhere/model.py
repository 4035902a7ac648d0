"""LookWhere (Fuller et al., 2025): a shallow selector decides where to look, a ViT extractor sees only there.

    images (B, 3, H, H), H = high_res_size (a multiple of 14), G = H / 14
      -> selector (no gradient): scores (B, G*G), prefix tokens (B, P, D)   [P = 5 dinov2 (CLS + 4 registers), 1 franca]
      -> top-k patches, embedded (conv patch embedding + position) and placed after the prefix tokens
      -> extractor: 12 ViT blocks + final norm over P + k tokens
      -> task "cls": head(token 0) (B, classes); task "seg": fill every grid cell from its 5 nearest kept patches,
         head per cell, (B, classes, G, G).

Two computations with the same result (to float tolerance):
- ops="reference": the official one, in plain PyTorch: embed every patch, add positions, gather the kept ones,
  batched attention, dense distance matrix + full sort for the fill. The in-process baseline.
- ops="fused": `lookfast.topk_patch_gather` embeds only the kept patches (unselected pixels are never read),
  packed tokens through `lookfast.varlen_attention`, a last block that computes only the CLS row for "cls",
  the head applied to the k kept tokens before the fill (it is linear and the fill weights sum to 1), and a fill
  that selects the 5 nearest by exact integer keys instead of sorting (see fill.py).

Beyond the official code, k may differ per image: `model(x, k=torch.tensor([...]))`, or the score-mass rule
`model(x, k_mass=0.5, k_min=16, k_max=300)`: per image the fewest top patches whose softmaxed selector scores sum
to at least k_mass, clamped to [k_min, k_max]. Ragged runs pack tokens (no padding) with ops="fused"; with
ops="reference" they loop over images. Either way each image's result equals running it alone with its k.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import lookfast

from ...ops.varlen_attention import check_cu_seqlens
from .fill import fill_fused, fill_reference
from .selector import Selector
from .vit import VisionTransformer, resize_pos_embed, swiglu_hidden

TYPES = {"dinov2": dict(num_reg_tokens=4, mlp="gelu"), "franca": dict(num_reg_tokens=0, mlp="swiglu")}
TASKS = ("cls", "seg")
OPS = ("reference", "fused")


@dataclass(frozen=True)
class LookWhereConfig:
    """Architecture and run settings. `lw_type` fills num_reg_tokens / mlp when they are left as None."""

    lw_type: str = "dinov2"
    high_res_size: int = 518
    k: int = 136
    num_classes: int = 0            # 0: no classifier (features out), like the official code
    task: str = "cls"
    ops: str = "reference"
    dim: int = 768
    num_heads: int = 12
    selector_depth: int = 3
    extractor_depth: int = 12
    num_reg_tokens: int | None = None
    mlp: str | None = None          # "gelu" | "swiglu"
    mlp_hidden: int | None = None   # default 4*dim (gelu) or franca's packed SwiGLU width
    patch_size: int = 14
    selector_size: int = 154        # the selector always reads 154 px (11x11 patches), whatever the input size
    pretrain_grid: int = 37         # extractor position table of the checkpoint: 518 px

    def resolved(self) -> "LookWhereConfig":
        """This config with num_reg_tokens, mlp and mlp_hidden filled from lw_type, after checking every field
        (ValueError naming the field: lw_type, high_res_size, task, ops, depths, k)."""
        if self.lw_type not in TYPES and (self.num_reg_tokens is None or self.mlp is None):
            raise ValueError(f"lw_type must be one of {sorted(TYPES)} (or give num_reg_tokens and mlp), got {self.lw_type!r}")
        defaults = TYPES.get(self.lw_type, {})
        cfg = replace(self,
                      num_reg_tokens=defaults["num_reg_tokens"] if self.num_reg_tokens is None else self.num_reg_tokens,
                      mlp=defaults["mlp"] if self.mlp is None else self.mlp)
        if cfg.mlp_hidden is None:
            cfg = replace(cfg, mlp_hidden=4 * cfg.dim if cfg.mlp == "gelu" else swiglu_hidden(cfg.dim))
        if cfg.high_res_size <= 0 or cfg.high_res_size % cfg.patch_size:
            raise ValueError(f"high_res_size must be a positive multiple of {cfg.patch_size}, got {cfg.high_res_size}")
        if cfg.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
        if cfg.ops not in OPS:
            raise ValueError(f"ops must be one of {OPS}, got {cfg.ops!r}")
        if cfg.extractor_depth < 1 or cfg.selector_depth < 1:
            raise ValueError("selector_depth and extractor_depth must be >= 1")
        _check_k_int("k", cfg.k, (cfg.high_res_size // cfg.patch_size) ** 2)
        return cfg


class LookWhere(nn.Module):
    """LookWhere downstream model. Submodules `selector` (backbone, head), `extractor`, `head` (nn.Linear or
    nn.Identity), so `state_dict()` has the official checkpoint's keys plus head.weight / head.bias.

    `ops` ("reference" | "fused"), `task` ("cls" | "seg") and `k` are plain attributes: switching them on a built
    model changes how the next forward runs (the weights are the same for all of them)."""

    def __init__(self, config: LookWhereConfig):
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        self.k, self.task, self.ops = cfg.k, cfg.task, cfg.ops
        self.patch_size = cfg.patch_size
        self.grid = cfg.high_res_size // cfg.patch_size
        shared = dict(dim=cfg.dim, num_heads=cfg.num_heads, num_reg_tokens=cfg.num_reg_tokens, mlp=cfg.mlp,
                      mlp_hidden=cfg.mlp_hidden, patch_size=cfg.patch_size)
        self.selector = Selector(depth=cfg.selector_depth, img_size=cfg.selector_size,
                                 pretrain_grid=cfg.pretrain_grid, **shared)
        self.extractor = VisionTransformer(grid=self.grid, depth=cfg.extractor_depth, **shared)
        # Default nn.Linear init, as the official LookWhereDownstream builds its head.
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, **kwargs) -> "LookWhere":
        """Randomly initialised model, e.g. `LookWhere.from_config(lw_type="franca", high_res_size=182, k=20)`."""
        return cls(LookWhereConfig(**kwargs))

    @classmethod
    def from_official_checkpoint(cls, path, high_res_size: int, k: int, num_classes: int, task: str = "cls",
                                 ops: str = "reference", **overrides) -> "LookWhere":
        """Load the authors' `lookwhere_{dinov2,franca}.pt` (type read from its contents, not its name)."""
        from ..checkpoint_io import load_checkpoint_file

        checkpoint = load_checkpoint_file(path)
        return cls.from_official_state_dict(checkpoint, high_res_size, k, num_classes, task, ops, **overrides)

    @classmethod
    def from_official_state_dict(cls, checkpoint: dict, high_res_size: int, k: int, num_classes: int,
                                 task: str = "cls", ops: str = "reference", **overrides) -> "LookWhere":
        """Build from `{"selector": {"backbone": sd, "head": {w1.*, w2.*}}, "extractor": sd}` (optionally "head":
        {weight, bias} for the classifier; otherwise it is freshly initialised). The extractor's position table is
        resized (bicubic) from its stored grid to high_res_size / 14."""
        flat = _flatten_official(checkpoint)
        cfg = LookWhereConfig(high_res_size=high_res_size, k=k, num_classes=num_classes, task=task, ops=ops,
                              **{**_infer_architecture(flat), **overrides})
        with torch.device("meta"):  # no random init of weights about to be overwritten
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        expected = model.state_dict()
        wanted = [key for key in expected if not key.startswith("head.")]
        missing = [key for key in wanted if key not in flat]
        if missing:
            raise KeyError(f"LookWhere checkpoint is missing {len(missing)} key(s): {', '.join(missing)}")
        unexpected = [key for key in flat if key not in expected]
        if unexpected:
            raise KeyError(f"LookWhere checkpoint has unexpected key(s): {', '.join(unexpected)}")
        flat["extractor.pos_embed"] = resize_pos_embed(flat["extractor.pos_embed"].float(), model.grid)
        head_keys = [key for key in expected if key.startswith("head.")]
        if any(key in flat for key in head_keys):
            absent = [key for key in head_keys if key not in flat]
            if absent:
                raise KeyError(f"LookWhere checkpoint head is missing key(s): {', '.join(absent)}")
        else:
            if isinstance(model.head, nn.Linear):
                model.head.reset_parameters()  # nn.Linear's default init, as the official downstream head
            flat.update({key: expected[key] for key in head_keys})
        for key, value in flat.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"LookWhere checkpoint {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(expected[key].shape)}")
        model.load_state_dict(flat, strict=True)
        return model

    # ------------------------------------------------------------------ inference packing
    def pack_weights(self, enabled: bool = True) -> "LookWhere":
        """Opt-in inference speed-up for bf16 weights on CPU, as inductor's `freezing` does: pack the weights of the
        selector's and the extractor's linear layers once for the CPU's matrix engine (`lookfast.models.
        packed_linear`): where torch has a bf16 brgemm micro-kernel for this CPU (AMX or AVX512-BF16), lookfast's
        packed_linear op (fp32 accumulation, each block's layer scale and residual add in the epilogue, one
        rounding: outputs close to, not bitwise, the unpacked ones), else oneDNN's own packs (bitwise the unpacked
        results). Used by ops="fused" only (ops="reference" stays the official computation). A weight replaced,
        or edited in place through the parameter (load_state_dict, optimizer step, `.to()`), is re-packed on its
        next use; an edit through `weight.data` is not seen: call pack_weights() again after one. float32 weights
        get autocast packs instead: bf16 copies in oneDNN's layout, used only under `torch.autocast("cpu",
        torch.bfloat16)`, where they give autocast's own linear results without re-casting every weight on every
        forward (memory: a bf16 copy of the linear weights); outside autocast a float32 model runs as unpacked.
        Does nothing where no kernel is available. enabled=False drops the packs. Returns self."""
        from ..packed_linear import is_packed, pack_linears, unpack_linears

        linears = [m for part in (self.selector, self.extractor) for m in part.modules() if isinstance(m, nn.Linear)]
        if enabled:
            rows = self.config.k + self.extractor.num_prefix_tokens  # layout hint: one image's extractor tokens
            packed = pack_linears(linears, batch_hint=rows) > 0
            autocast_only = packed and all(m.weight.dtype == torch.float32 for m in linears if is_packed(m))
            self.selector.packed_linears = "autocast" if autocast_only else packed
        else:
            unpack_linears(linears)
            self.selector.packed_linears = False
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, k=None, *, k_mass: float | None = None, k_min: int = 1,
                k_max: int | None = None) -> torch.Tensor:
        """images (B, 3, H, H) -> (B, classes) for task "cls", (B, classes, G, G) for "seg" (classes = D when
        num_classes is 0). k: int or (B,) int tensor (default: the model's k); or k_mass/k_min/k_max (see module)."""
        out = self.forward_with_intermediates(images, k, k_mass=k_mass, k_min=k_min, k_max=k_max)
        return out[f"{self.task}_logits"]

    def forward_with_intermediates(self, images: torch.Tensor, k=None, *, k_mass: float | None = None,
                                   k_min: int = 1, k_max: int | None = None, task: str | None = None) -> dict:
        """Like forward, returning a dict: "cls_logits" and/or "seg_logits" (task: "cls", "seg" or "both"; default
        the model's), "selector_map" (B, G*G), "prefix_tokens" (B, P, D), "keep" ((B, k) int64 in descending score
        order; ragged: packed (sum k,) with "cu_seqlens" (B+1,) int32) and "k" (the int or (B,) tensor used)."""
        task = task or self.task
        if task not in TASKS + ("both",):
            raise ValueError(f"task must be 'cls', 'seg' or 'both', got {task!r}")
        (scores, prefix), k = self.select(images, k, k_mass=k_mass, k_min=k_min, k_max=k_max)
        out = self.extract(images, scores, prefix, k, task)
        out.update(selector_map=scores, prefix_tokens=prefix, k=k)
        return out

    # ------------------------------------------------------------------ the two stages (forward and the engine)
    # forward is select then extract; lookfast.serving's LookWherePipeline runs them as two stages with batches
    # regrouped in between. Both go through these two methods only, so they cannot drift apart.
    def select(self, images: torch.Tensor, k=None, *, k_mass: float | None = None, k_min: int = 1,
               k_max: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], int | torch.Tensor]:
        """Stage 1, the selector: checks images (B, 3, H, H) (TypeError / ValueError as forward), runs the selector
        without gradient and resolves k. Returns ((scores (B, G*G), prefix (B, P, D)), k), k as `resolve_k` gives
        it: an int (k given as an int, or None: the model's k) or a (B,) int64 tensor (k as a tensor, or k_mass).
        Row i of every output depends on image i alone."""
        self._check_images(images)
        with torch.no_grad():
            scores, prefix = self.selector(images, self.grid, packed=self.ops == "fused")
        return (scores, prefix), self.resolve_k(scores, k, k_mass, k_min, k_max)

    def extract(self, images: torch.Tensor, scores: torch.Tensor, prefix: torch.Tensor, k,
                task: str | None = None) -> dict:
        """Stage 2, the extractor on the top-k patches: images (B, 3, H, H) as given to `select`, its scores and
        prefix (rows may be any subset of select's, regrouped, in any order) and k: an int (dense path: every image
        keeps k) or a (B,) int64 tensor with values in 1..G*G (ragged path: ops="fused" packs tokens, "reference"
        loops over images). k is not re-checked: give what `select`/`resolve_k` returned. task: "cls", "seg",
        "both" (default the model's). Returns forward_with_intermediates' "cls_logits"/"seg_logits", "keep" and
        (ragged) "cu_seqlens", computed by ops="reference" or "fused" as the model's `ops` says."""
        run = self._reference if self.ops == "reference" else self._fused
        return run(images, scores, prefix, k, task or self.task)

    def _reference(self, images, scores, prefix, k, task) -> dict:
        if isinstance(k, torch.Tensor):  # ragged: one image at a time, then packed like the fused outputs
            runs = [self._reference(images[i:i + 1], scores[i:i + 1], prefix[i:i + 1], int(k[i]), task)
                    for i in range(images.shape[0])]
            out = {name: torch.cat([r[name] for r in runs]) for name in runs[0] if name != "keep"}
            out["keep"] = torch.cat([r["keep"][0] for r in runs])
            out["cu_seqlens"] = F.pad(torch.cumsum(k, 0), (1, 0)).to(torch.int32)
            return out
        ext, b = self.extractor, images.shape[0]
        keep = torch.topk(scores, k, dim=1, sorted=True).indices
        patches = ext.embed_patches(images)  # every patch, as the official code does
        x = patches[torch.arange(b, device=images.device)[:, None], keep]
        x = ext.forward_blocks(torch.cat([prefix, x], dim=1))
        out = {"keep": keep}
        if task in ("cls", "both"):
            out["cls_logits"] = self.head(x[:, 0])
        if task in ("seg", "both"):
            filled = fill_reference(keep, x[:, ext.num_prefix_tokens:], self.grid)
            out["seg_logits"] = self.head(filled).permute(0, 3, 1, 2)
        return out

    def _fused(self, images, scores, prefix, k, task) -> dict:
        ext, b = self.extractor, images.shape[0]
        p, d = ext.num_prefix_tokens, ext.dim
        proj = ext.patch_embed.proj
        ragged = isinstance(k, torch.Tensor)
        if ragged:
            keep, tokens, patch_cu = lookfast.topk_patch_gather(images, scores, k, self.patch_size, proj.weight,
                                                                proj.bias, ext.pos_embed)
            out = {"keep": keep, "cu_seqlens": patch_cu}
            x, cu, patch_rows, max_len = _pack_ragged(prefix, tokens, k, patch_cu)
        else:
            keep, tokens = lookfast.topk_patch_gather(images, scores, k, self.patch_size, proj.weight, proj.bias,
                                                  ext.pos_embed)
            max_len = p + k
            x = torch.cat([prefix, tokens], dim=1).reshape(b * max_len, d)
            cu = torch.arange(b + 1, dtype=torch.int32, device=images.device) * max_len
            out = {"keep": keep}
        # One check of the packed layout per forward; the blocks then call the attention op without re-validating.
        check_cu_seqlens(cu, cu, x.shape[0], x.shape[0], max_len, max_len)
        cls_rows = cu[:-1].long()
        if task == "cls":
            # Only token 0 is read: the last block attends from the CLS row alone and runs its MLP on it.
            for block in ext.blocks[:-1]:
                x = block.forward_packed(x, cu, max_len)
            x = ext.blocks[-1].forward_packed(x, cu, max_len, query_rows=cls_rows)
            out["cls_logits"] = self.head(ext.norm(x))
            return out
        for block in ext.blocks:
            x = block.forward_packed(x, cu, max_len)
        x = ext.norm(x)
        if task == "both":
            out["cls_logits"] = self.head(x[cls_rows])
        if ragged:
            values = self.head(x[patch_rows])  # (sum k, classes): head before the fill, on k rows not G*G
            keep_pad, values_pad = _pad_ragged(keep, values, k)
            out["seg_logits"] = fill_fused(keep_pad, values_pad, self.grid, lengths=k)
        else:
            values = self.head(x.view(b, max_len, d)[:, p:])
            out["seg_logits"] = fill_fused(keep, values, self.grid)
        return out

    # ------------------------------------------------------------------ checks
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        size = self.config.high_res_size
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"images height and width must be multiples of {self.patch_size}, got {h}x{w}")
        if (h, w) != (size, size):
            raise ValueError(f"images must be {size}x{size} (the model's high_res_size), got {h}x{w}; "
                             "build the model with high_res_size matching the input")
        from ..checkpoint_io import check_finite_images

        check_finite_images(images)

    def resolve_k(self, scores: torch.Tensor, k=None, k_mass: float | None = None, k_min: int = 1,
                  k_max: int | None = None):
        """The k that forward uses for selector scores (B, G*G): the model's k when k and k_mass are None; k as an
        int in 1..G*G; k as a (B,) integer tensor with values in 1..G*G (returned as int64 on scores' device); or,
        with k_mass in (0, 1], `k_from_mass(scores, k_mass, k_min, k_max)` ((B,) int64; k_min, k_max ints in
        1..G*G, k_min <= k_max, k_max default G*G). Raises ValueError (out of range, wrong shape, both k and k_mass)
        or TypeError (k neither int nor integer tensor), naming the argument."""
        n = self.grid * self.grid
        if k_mass is not None:
            if k is not None:
                raise ValueError("give either k or k_mass, not both")
            k_max = n if k_max is None else k_max
            _check_k_int("k_min", k_min, n)
            _check_k_int("k_max", k_max, n)
            if k_min > k_max:
                raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max})")
            if not 0.0 < float(k_mass) <= 1.0:
                raise ValueError(f"k_mass must be in (0, 1], got {k_mass}")
            return k_from_mass(scores, float(k_mass), k_min, k_max)
        if k is None:
            return self.k
        if isinstance(k, torch.Tensor):
            if k.dim() != 1 or k.shape[0] != scores.shape[0]:
                raise ValueError(f"k as a tensor must be (B,) = ({scores.shape[0]},), got shape {tuple(k.shape)}")
            if k.dtype.is_floating_point or k.dtype == torch.bool or k.is_complex():
                raise TypeError(f"k must be an integer tensor, got {k.dtype}")
            if k.numel() and (int(k.min()) < 1 or int(k.max()) > n):
                raise ValueError(f"k must be in 1..{n} (the {self.grid}x{self.grid} patch grid), got {k.tolist()}")
            return k.to(device=scores.device, dtype=torch.int64)
        return _check_k_int("k", k, n)


def k_from_mass(scores: torch.Tensor, mass: float, k_min: int, k_max: int) -> torch.Tensor:
    """Per image, the fewest top patches whose softmax(scores) sum reaches `mass`, clamped to [k_min, k_max].
    scores (B, N) -> (B,) int64."""
    probs = torch.softmax(scores.float(), dim=-1).sort(dim=-1, descending=True).values
    below = (probs.cumsum(-1) < mass).sum(-1)  # patches strictly before the mass is reached
    return (below + 1).clamp(k_min, k_max)


def _check_k_int(name: str, k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int or a (B,) integer tensor, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be in 1..{n} (patches in the high-res grid), got {k}")
    return k


def _pack_ragged(prefix: torch.Tensor, tokens: torch.Tensor, k: torch.Tensor, patch_cu: torch.Tensor):
    """Interleave per-image prefix tokens (B, P, D) with packed patch tokens (sum k, D; image b's rows from patch_cu[b],
    the cu_seqlens topk_patch_gather returned) into sequences [prefix_i, patches_i].
    Returns (x (sum k + B*P, D), cu_seqlens (B+1,) int32, patch_rows (sum k,), max_len)."""
    b, p, d = prefix.shape
    cu = patch_cu + p * torch.arange(b + 1, dtype=torch.int32, device=k.device)  # each sequence gains P prefix rows
    image_of_patch = torch.repeat_interleave(torch.arange(b, device=k.device), k, output_size=tokens.shape[0])
    patch_rows = torch.arange(tokens.shape[0], device=k.device) + p * (image_of_patch + 1)
    prefix_rows = (cu[:-1, None] + torch.arange(p, device=k.device)).reshape(-1)
    x = tokens.new_empty(tokens.shape[0] + b * p, d)
    x[prefix_rows] = prefix.reshape(b * p, d).to(tokens.dtype)
    x[patch_rows] = tokens
    return x, cu, patch_rows, int(k.max()) + p


def _pad_ragged(keep: torch.Tensor, values: torch.Tensor, k: torch.Tensor):
    """Packed keep (sum k,) and values (sum k, C) -> padded (B, max k) and (B, max k, C) (pads: id 0, zeros)."""
    b, width = k.shape[0], int(k.max())
    valid = torch.arange(width, device=k.device) < k[:, None]
    keep_pad = keep.new_zeros(b, width)
    keep_pad[valid] = keep
    values_pad = values.new_zeros(b, width, values.shape[-1])
    values_pad[valid] = values
    return keep_pad, values_pad


def _flatten_official(checkpoint: dict) -> dict:
    """{"selector": {"backbone": sd, "head": sd}, "extractor": sd[, "head": sd]} -> flat "a.b.c" keys."""
    if not isinstance(checkpoint, dict) or "selector" not in checkpoint or "extractor" not in checkpoint:
        raise KeyError("LookWhere checkpoint must be a dict with 'selector' and 'extractor' entries")
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", checkpoint)
    return flat


def _infer_architecture(flat: dict) -> dict:
    """Type and sizes from the checkpoint's contents: registers -> dinov2, packed SwiGLU (fc2 reads half of fc1's
    width) -> franca; width, depths and MLP width from the shapes. Missing keys fall back to ViT-B defaults (the
    strict key check then names them)."""
    found = {}
    cls_token = flat.get("selector.backbone.cls_token")
    if cls_token is not None:
        found["dim"] = cls_token.shape[-1]
        found["num_heads"] = max(1, cls_token.shape[-1] // 64)  # every DINOv2/franca ViT uses 64-wide heads
    reg = flat.get("selector.backbone.reg_token")
    found["num_reg_tokens"] = 0 if reg is None else reg.shape[1]
    fc1, fc2 = flat.get("extractor.blocks.0.mlp.fc1.weight"), flat.get("extractor.blocks.0.mlp.fc2.weight")
    mlp = "gelu"
    if fc1 is not None and fc2 is not None:
        mlp = "swiglu" if fc2.shape[1] * 2 == fc1.shape[0] else "gelu"
        found["mlp_hidden"] = fc1.shape[0]
    found["mlp"] = mlp
    found["lw_type"] = "franca" if (mlp == "swiglu" and not found["num_reg_tokens"]) else "dinov2"
    for part, name in (("selector.backbone", "selector_depth"), ("extractor", "extractor_depth")):
        ids = {int(m.group(1)) for key in flat if (m := re.match(rf"{re.escape(part)}\.blocks\.(\d+)\.", key))}
        if ids:
            found[name] = max(ids) + 1
    return found
