"""M2: the LookWhere model (dinov2 type, random weights: timing does not depend on their values).

lookfast's fused ops against the same model with reference ops (the official computation: embed every patch,
gather, dense sort for the fill), and at 1036 px the full-resolution ViT-B/14 (same extractor, all 5476 patches),
whose time ratio is reported beside its MACs ratio.

bf16 variants (ids ending in -bf16) at 1036 px, k 274, B 1, cls and seg: lookfast fused with bf16 weights (packed
once for the matrix engine by `LookWhere.pack_weights`, the eager counterpart of inductor's freezing; the unpacked
model is timed beside it) against
the official computation in bf16 both ways a user would run it (weights cast to bf16; float32 weights under
`torch.autocast("cpu", torch.bfloat16)`) and the same under `torch.compile` with `freezing` on (inductor folds the
weights as constants, its best inference mode). Bars: >= 2x the official bf16 (each way, so >= 2x the faster) and
>= 1.3x the compiled one; a note gives the extractor's achieved GFLOP/s (its 12 blocks on the packed tokens, timed
alone) against the bf16 matrix-multiply ceiling (bar: >= 50%).
"""
from __future__ import annotations

import torch

from .. import ceilings
from ..case import Case, dtype_variants

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


OURS_BF16 = "lookfast fused (bf16 weights, packed)"
UNPACKED_BF16 = "lookfast fused (bf16 weights, not packed)"
EXTRACTOR_BF16 = "lookfast extractor only (bf16, packed)"
FILL_BF16 = "lookfast segmentation fill only (bf16)"


def extractor_macs(k: int, task: str) -> int:
    """Multiply-accumulates of the extractor's blocks alone (the part that runs on the matrix engine)."""
    return _blocks_macs(PREFIX + k, DEPTH, query_tokens_last=1 if task == "cls" else None)


def _setup_bf16(size: int, k: int, task: str, with_compile: bool):
    def build():
        import copy

        from lookfast.models.lookwhere import LookWhere

        torch.manual_seed(0)
        model32 = LookWhere.from_config(high_res_size=size, k=k, num_classes=1000 if task == "cls" else 150,
                                        task=task).eval()
        model16 = copy.deepcopy(model32).to(torch.bfloat16)
        # lookfast's row: its weights packed once for the matrix engine (`pack_weights`, opt-in as freezing is);
        # a copy, so the official rows, which share model16, run the plain official code.
        packed16 = copy.deepcopy(model16).pack_weights()
        packed32 = copy.deepcopy(model32).pack_weights()  # float32 weights: autocast packs (bf16 copies)
        images = torch.randn(1, 3, size, size)
        images16 = images.to(torch.bfloat16)

        def run(model, ops, x, autocast=False):
            def call():
                model.ops = ops
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    return model(x)
            return call

        impls = {
            OURS_BF16: run(packed16, "fused", images16),
            UNPACKED_BF16: run(model16, "fused", images16),
            "official bf16 (cast weights)": run(model16, "reference", images16),
            "official bf16 (autocast)": run(model32, "reference", images, autocast=True),
            "lookfast fused (autocast)": run(model32, "fused", images, autocast=True),
            "lookfast fused (autocast, packed)": run(packed32, "fused", images, autocast=True),
        }
        ext = packed16.extractor
        with torch.inference_mode():
            scores, prefix = packed16.selector(images16, packed16.grid)
            _, tokens = __import__("lookfast").topk_patch_gather(images16, scores, k, PATCH,
                                                                 ext.patch_embed.proj.weight,
                                                                 ext.patch_embed.proj.bias, ext.pos_embed)
        length = PREFIX + k
        x0 = torch.cat([prefix, tokens], dim=1).reshape(length, DIM)
        cu = torch.tensor([0, length], dtype=torch.int32)

        def extractor():
            with torch.inference_mode():
                x = x0
                for block in ext.blocks[:-1]:
                    x = block.forward_packed(x, cu, length)
                return ext.blocks[-1].forward_packed(x, cu, length, query_rows=cu[:1].long() if task == "cls" else None)

        impls[EXTRACTOR_BF16] = extractor
        if task == "seg":  # the fill alone, on the selector's own top-k (its share of the forward: a note below)
            from lookfast.models.lookwhere.fill import fill_fused

            keep = scores.float().topk(k, dim=-1).indices
            values = torch.randn(1, k, 150).to(torch.bfloat16)
            impls[FILL_BF16] = lambda: fill_fused(keep, values, packed16.grid)
        if with_compile:
            import torch._inductor.config as inductor_config

            ref_cast, ref_auto = copy.deepcopy(model16), copy.deepcopy(model32)
            ref_cast.ops = ref_auto.ops = "reference"
            compiled_cast, compiled_auto = torch.compile(ref_cast), torch.compile(ref_auto)

            def run_compiled(fn, x, autocast):
                def call():
                    with inductor_config.patch(freezing=True), torch.no_grad(), \
                            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                        return fn(x)
                return call

            impls["official bf16 cast, torch.compile (freezing)"] = run_compiled(compiled_cast, images16, False)
            impls["official autocast, torch.compile (freezing)"] = run_compiled(compiled_auto, images, True)
        return impls

    return build


def _summary_bf16(size: int, k: int, task: str):
    def summarize(times: dict[str, float]) -> list[str]:
        notes = []
        ext = times.get(EXTRACTOR_BF16)
        ceiling = ceilings.matmul_gflops(1024, 0.2, torch.bfloat16) if ext or times.get(OURS_BF16) else None
        if ext:
            rate = 2 * extractor_macs(k, task) / ext / 1e9
            notes.append(f"extractor: {rate:.1f} GFLOP/s = {100 * rate / ceiling:.0f}% of the bf16 mm ceiling "
                         f"{ceiling:.1f} GFLOP/s (bar: >= 50%, {'met' if rate >= 0.5 * ceiling else 'NOT met'})")
        if times.get(FILL_BF16) and times.get(OURS_BF16):
            share = times[FILL_BF16] / times[OURS_BF16]
            notes.append(f"segmentation fill: {1e3 * times[FILL_BF16]:.2f} ms = {100 * share:.1f}% of the seg forward "
                         f"(bar: <= 5%, {'met' if share <= 0.05 else 'NOT met'})")
        official = [times[n] for n in ("official bf16 (cast weights)", "official bf16 (autocast)") if n in times]
        if official and times.get(OURS_BF16):
            notes.append(f"lookfast bf16 vs the faster official bf16: {min(official) / times[OURS_BF16]:.2f}x "
                         "(bar >= 2x)")
            # The bound on that ratio: lookfast's own FLOPs (selector, embedding, extractor) at the bf16 mm
            # ceiling, with every non-GEMM step (attention, resize, norms) free.
            floor = 2 * lookwhere_macs(size, k, task) / (ceiling * 1e9)
            notes.append(f"lookfast's FLOPs at the bf16 mm ceiling alone: {1e3 * floor:.1f} ms, so at most "
                         f"{min(official) / floor:.2f}x the faster official bf16 on this CPU")
        return notes

    return summarize


def _case_bf16(size: int, k: int, task: str, quick: bool, with_compile: bool) -> Case:
    bars = {"official bf16 (cast weights)": 2.0, "official bf16 (autocast)": 2.0}
    if with_compile:
        bars.update({"official bf16 cast, torch.compile (freezing)": 1.3,
                     "official autocast, torch.compile (freezing)": 1.3})
    return Case(
        id=f"M2-{task}{size}",
        op="lookwhere",
        shape=f"dinov2 {task} {size}px B1 k{k} bf16",
        setup=_setup_bf16(size, k, task, with_compile),
        flops=2 * lookwhere_macs(size, k, task),
        bars=bars,
        quick=quick,
        multi_thread=False,
        summarize=_summary_bf16(size, k, task),
        turns=3,
    )


def _variants(size: int, k: int, task: str, quick: bool, full_vit: bool = False, with_compile: bool = True):
    """float32: the original case; bfloat16: the bf16 peers above."""
    def make(dtype):
        if dtype == torch.float32:
            return _case(size, 1, k, task, quick=quick, full_vit=full_vit)
        return _case_bf16(size, k, task, quick=quick, with_compile=with_compile)
    return dtype_variants(make)


def cases() -> list[Case]:
    return [
        _case(518, 1, 136, "cls", quick=True),
        *_variants(1036, 274, "cls", quick=False, full_vit=True),
        *_variants(1036, 274, "seg", quick=False),
        _case(518, 8, 136, "cls", quick=False),
        _case(518, 8, 136, "seg", quick=False),
    ]
