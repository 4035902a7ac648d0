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
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

FAMILIES = ("dyn_perceiver", "lookwhere")


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

    @classmethod
    def parse(cls, model: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
              options: dict | None = None, seed: int = 0) -> "ModelSpec":
        """Parse "family:name" (see the module docstring). Raises ValueError for an unknown family or config, a
        missing checkpoint file, or neither/both of checkpoint and random_weights."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be 'family:name' (e.g. dyn_perceiver:reg800m_perceiver_t128), got {model!r}")
        family, _, name = model.partition(":")
        family = family.strip().lower().replace("-", "_")
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
        return cls(family, name, checkpoint, random_weights, seed, options)

    def load(self) -> torch.nn.Module:
        """Build the model in eval mode (CPU, float32)."""
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
                else:
                    model = LookWhere.from_config(**opts)
        return model.eval()

    def describe(self) -> str:
        weights = self.checkpoint or f"RANDOM weights (seed {self.seed})"
        name = f"{self.family}:{self.name}" if self.name else self.family
        opts = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"{name}{opts} from {weights}"
