"""M2: the LookWhere model (dinov2 type, random weights: timing does not depend on their values).

lookfast's fused ops against the same model with reference ops (the official computation: embed every patch,
gather, dense sort for the fill), and at 1036 px the full-resolution ViT-B/14 (same extractor, all 5476 patches),
whose time ratio is reported beside its MACs ratio.
"""
from __future__ import annotations

import torch

from ..case import Case

PATCH, DIM, HIDDEN, DEPTH, PREFIX = 14, 768, 3072, 12, 5
SELECTOR_TOKENS, SELECTOR_DEPTH = 121, 3


def _blocks_macs(tokens: int, depth: int, query_tokens_last: int | None = None) -> int:
    """ViT-B blocks: qkv + proj + MLP per token, plus q.k and p.v over all token pairs."""
    per_token = 4 * DIM * DIM + 2 * DIM * HIDDEN
    full = tokens * per_token + 2 * tokens * tokens * DIM
    if query_tokens_last is None:
        return depth * full
    last = tokens * 2 * DIM * DIM + query_tokens_last * (2 * DIM * DIM + 2 * DIM * HIDDEN + 2 * tokens * DIM)
    return (depth - 1) * full + last


def lookwhere_macs(size: int, k: int, task: str) -> int:
    """Multiply-accumulates of one image through the fused LookWhere path."""
    grid = size // PATCH
    selector = (SELECTOR_TOKENS * DIM * 3 * PATCH * PATCH + _blocks_macs(SELECTOR_TOKENS + PREFIX, SELECTOR_DEPTH)
                + SELECTOR_TOKENS * (DIM * 4 * DIM + 4 * DIM * 16))
    embed = k * DIM * 3 * PATCH * PATCH
    extractor = _blocks_macs(PREFIX + k, DEPTH, query_tokens_last=1 if task == "cls" else None)
    fill = grid * grid * 5 if task == "seg" else 0
    return selector + embed + extractor + fill


def full_vit_macs(size: int) -> int:
    """Multiply-accumulates of one image through a ViT-B/14 on every patch."""
    n = (size // PATCH) ** 2
    return n * DIM * 3 * PATCH * PATCH + _blocks_macs(n + PREFIX, DEPTH)


def _setup(size: int, batch: int, k: int, task: str, with_full_vit: bool):
    def build():
        from lookfast.models.lookwhere import LookWhere

        torch.manual_seed(0)
        model = LookWhere.from_config(high_res_size=size, k=k, num_classes=1000 if task == "cls" else 150,
                                      task=task).eval()
        images = torch.randn(batch, 3, size, size)

        def run(ops):
            def call():
                model.ops = ops
                with torch.inference_mode():
                    return model(images)
            return call

        impls = {"lookfast fused": run("fused"), "reference ops (official)": run("reference")}
        if with_full_vit:
            ext = model.extractor

            def full_vit():
                with torch.inference_mode():
                    tokens = torch.cat([ext.prefix_tokens(batch), ext.embed_patches(images)], dim=1)
                    return model.head(ext.forward_blocks(tokens)[:, 0])

            impls["full-res ViT-B/14 (all patches)"] = full_vit
        return impls

    return build


def _summary(size: int, k: int, task: str):
    def summarize(times: dict[str, float]) -> list[str]:
        ours, full = times.get("lookfast fused"), times.get("full-res ViT-B/14 (all patches)")
        ref = times.get("reference ops (official)")
        if not ours or not full:
            return []
        macs_ratio = full_vit_macs(size) / lookwhere_macs(size, k, task)
        notes = [f"full-res ViT-B/14 time / lookfast time = {full / ours:.1f}x; MACs ratio = {macs_ratio:.1f}x"]
        if ref:
            notes.append(f"full-res ViT-B/14 time / reference-ops time = {full / ref:.1f}x")
        return notes

    return summarize


def _case(size: int, batch: int, k: int, task: str, quick: bool, full_vit: bool = False) -> Case:
    bar = 1.08 if task == "cls" else 1.3
    return Case(
        id=f"M2-{task}{size}" + ("" if batch == 1 or size == 1036 else f"b{batch}"),
        op="lookwhere",
        shape=f"dinov2 {task} {size}px B{batch} k{k}",
        setup=_setup(size, batch, k, task, full_vit),
        flops=2 * batch * lookwhere_macs(size, k, task),
        bars={"reference ops (official)": bar} if size == 1036 else {},
        quick=quick,
        multi_thread=not full_vit,  # the full-resolution ViT takes ~1 TMAC per call: one thread count only
        summarize=_summary(size, k, task) if full_vit else None,
        turns=3,
    )


def cases() -> list[Case]:
    return [
        _case(518, 1, 136, "cls", quick=True),
        _case(1036, 1, 274, "cls", quick=False, full_vit=True),
        _case(1036, 1, 274, "seg", quick=False),
        _case(518, 8, 136, "cls", quick=False),
        _case(518, 8, 136, "seg", quick=False),
    ]
