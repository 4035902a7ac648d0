"""A model named on the command line: "family:name" plus a checkpoint (or seeded random weights), as a small picklable
description that every process (a Ray actor included) turns into the same model.

    spec = ModelSpec.parse("dyn_perceiver:reg800m_perceiver_t128", checkpoint="reg800m_t128.pth")
    spec = ModelSpec.parse("lookwhere:dinov2", checkpoint="lookwhere_dinov2.pt",
                           options={"high_res_size": 518, "num_classes": 1000})
    model = spec.load()              # eval mode

Families:
- `dyn_perceiver:<config>`: a config of `lookfast.models.dyn_perceiver.CONFIGS` (e.g. reg800m_perceiver_t128). The
  checkpoint is an official one (`from_official_checkpoint`). Options: the DynPerceiver constructor's arguments
  (num_classes, input_size, ...).
- `lookwhere[:dinov2|franca]`: the checkpoint is the authors' `lookwhere_{dinov2,franca}.pt`, its type read from
  its contents (a classifier head under "head" is loaded when present). Options: high_res_size (default 518), k
  (default 136, the model's default k), num_classes (required: the classes the head predicts), task ("cls" | "seg")
  and the LookWhereConfig fields.
Every model is built with ops="fused" (lookfast kernels) unless options say "reference".

Precision (`dtype`): "float32" (default; the authors' float32 outputs, the existing contract), "bfloat16" or
"float16". In bf16/fp16 the loaded model's weights are cast (`model.to(dtype)`) and LookWhere's bf16 weights packed
(`LookWhere.pack_weights()`: faster, within the bf16 accuracy rule; a no-op where no packed kernel is available). The serving
Engine casts each (float32-decoded) image to the model's dtype right before the model call, and `lookfast infer` /
`lookfast serve` convert the logits to float32 before softmax / argmax, so rows and answers keep their float32 types.
A low precision the CPU has no matrix engine for (bf16 without AVX512-BF16 / AMX-BF16, fp16 without AVX512-FP16 /
AMX-FP16) runs correctly but gains nothing and may be much slower than float32: `load()` warns once.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

FAMILIES = ("dyn_perceiver", "lookwhere")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CPU matrix features (lookfast.benchmarks.ceilings.matrix_features) that make each low precision fast.
_FAST_ON = {"bfloat16": ("AMX-BF16", "AVX512-BF16"), "float16": ("AMX-FP16", "AVX512-FP16")}


def split_model_name(model: str) -> tuple[str, str]:
    """"family:name" -> (family, name), the family lower-cased with "-" read as "_" ("Dyn-Perceiver:x" ->
    ("dyn_perceiver", "x")); name is "" when there is no ":". Checks nothing else (ModelSpec.parse does); raises
    ValueError when `model` is not a non-empty str."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be 'family:name' (e.g. dyn_perceiver:reg800m_perceiver_t128), got {model!r}")
    family, _, name = model.partition(":")
    return family.strip().lower().replace("-", "_"), name


@dataclass(frozen=True)
class ModelSpec:
    """family: "dyn_perceiver" | "lookwhere"; name: the Dyn-Perceiver config or the LookWhere type ("" = from the
    checkpoint); checkpoint: a path, or None with random_weights=True (built under torch.manual_seed(seed), so every
    process builds identical weights); options: constructor keyword arguments."""

    family: str
    name: str = ""
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    options: dict = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @classmethod
    def parse(cls, model: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
              options: dict | None = None, seed: int = 0, dtype: str = "float32") -> "ModelSpec":
        """Parse "family:name" (see the module docstring). Raises ValueError for an unknown family or config, a
        missing checkpoint file, neither/both of checkpoint and random_weights, or a dtype other than "float32",
        "bfloat16" and "float16"."""
        dtype = dtype_name(dtype)
        family, name = split_model_name(model)
        if family not in FAMILIES:
            raise ValueError(f"model {model!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        if family == "dyn_perceiver":
            from .dyn_perceiver import CONFIGS

            if name not in CONFIGS:
                raise ValueError(f"model {model!r}: unknown Dyn-Perceiver config {name!r}; "
                                 f"known: {', '.join(sorted(CONFIGS))}")
        elif name not in ("", "dinov2", "franca"):
            raise ValueError(f"model {model!r}: LookWhere type must be 'dinov2' or 'franca', got {name!r}")
        if checkpoint is None and not random_weights:
            raise ValueError(f"model {model!r}: give a checkpoint path, or random_weights=True to try it untrained")
        if checkpoint is not None and random_weights:
            raise ValueError("give either a checkpoint or random_weights, not both")
        if checkpoint is not None:
            checkpoint = os.path.abspath(os.fspath(checkpoint))
            if not os.path.isfile(checkpoint):
                raise ValueError(f"checkpoint {checkpoint!r} is not a file")
        options = dict(options or {})
        if family == "lookwhere":
            if not options.get("num_classes"):
                raise ValueError("a LookWhere model for inference needs options['num_classes'] > 0 (the classes its "
                                 "head predicts; the official checkpoints hold no head)")
            if name and checkpoint is None:
                options.setdefault("lw_type", name)
        return cls(family, name, checkpoint, random_weights, seed, options, dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch.dtype."""
        return DTYPES[self.dtype]

    def load(self) -> torch.nn.Module:
        """Build the model in eval mode on the CPU, in `dtype` (weights cast; LookWhere's bf16 weights packed, see
        the module docstring). Warns once per process when the CPU has no matrix engine for a low precision."""
        opts = dict(self.options)
        opts.setdefault("ops", "fused")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.family == "dyn_perceiver":
                from . import dyn_perceiver

                if self.checkpoint:
                    model = dyn_perceiver.from_official_checkpoint(self.checkpoint, self.name, **opts)
                else:
                    model = dyn_perceiver.build(self.name, **opts)
            else:
                from .lookwhere import LookWhere

                if self.checkpoint:
                    opts.setdefault("high_res_size", 518)
                    opts.setdefault("k", 136)
                    checkpoint = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
                    if isinstance(checkpoint, dict) and "head" not in checkpoint:
                        warnings.warn(f"LookWhere checkpoint {self.checkpoint!r} has no classifier head: the head is "
                                      "randomly initialised and its predictions mean nothing", stacklevel=2)
                    model = LookWhere.from_official_state_dict(
                        checkpoint, opts.pop("high_res_size"), opts.pop("k"), opts.pop("num_classes"),
                        opts.pop("task", "cls"), opts.pop("ops"), **opts)
                    if self.name and model.config.lw_type != self.name:
                        raise ValueError(f"model lookwhere:{self.name} but the checkpoint {self.checkpoint!r} holds "
                                         f"a {model.config.lw_type} LookWhere")
                else:
                    model = LookWhere.from_config(**opts)
        model = model.eval()
        if self.dtype != "float32":
            slow = _slow_precision_message(self.dtype)
            if slow:
                from .._backend import warn_once

                warn_once(f"spec-dtype-{self.dtype}", slow)  # points at the caller of load()
            model = model.to(self.torch_dtype)
            if self.dtype == "bfloat16" and hasattr(model, "pack_weights"):
                model.pack_weights()  # docs/models.md; does nothing where no packed kernel is available
        return model

    def describe(self) -> str:
        """One line for logs: "family:name option=value ... from <checkpoint path | RANDOM weights (seed N)>"."""
        weights = self.checkpoint or f"RANDOM weights (seed {self.seed})"
        name = f"{self.family}:{self.name}" if self.name else self.family
        opts = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        if self.dtype != "float32":
            opts += f" dtype={self.dtype}"
        return f"{name}{opts} from {weights}"


def add_dtype_argument(group, outputs: str) -> None:
    """The `--dtype` option of `lookfast infer` and `lookfast serve` (choices: DTYPES); `outputs` says what the
    command does with the probabilities ("written", "answered")."""
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                       help="model precision (default float32: the authors' float32 outputs). bfloat16/float16: "
                            "weights and (after decoding in float32) images cast, probabilities computed and "
                            f"{outputs} in float32; they match float32 within bf16/fp16 rounding (a borderline "
                            "top-1 may flip). Faster only on CPUs with AVX512-BF16 or AMX (bf16), AVX512-FP16 or "
                            "AMX-FP16 (fp16); warns otherwise")


def dtype_name(dtype) -> str:
    """"float32" / "bfloat16" / "float16" from that name or the torch.dtype; ValueError naming `dtype` otherwise."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if dtype == value:
                return name
    elif isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _slow_precision_message(dtype: str) -> str | None:
    """The warning for a low precision this CPU has none of the matrix features for (the model then runs correctly
    but without a matrix engine: Dyn-Perceiver in fp16 ran ~4x slower than fp32 on an AVX512-BF16-only CPU), else
    None."""
    from ..benchmarks.ceilings import matrix_features

    fast = _FAST_ON[dtype]
    if any(f in fast for f in matrix_features()):
        return None
    return (f"dtype={dtype}: this CPU has no {' or '.join(fast)}, so {dtype} gains no speed here and may run much "
            "slower than float32; float32 is the better choice on this machine")
