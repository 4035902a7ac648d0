"""Cases and the accuracy rule shared by the tests of the CUDA kernels: on a real GPU (test_gpu.py) and on the CPU
emulator (test_cuda_emulated.py)."""
import torch
import torch.nn.functional as F



# (lens_q, lens_k, heads, kv_heads, dk, dv, causal): ragged with 0 and 1, GQA (4 query heads on 2 and on 1 kv heads),
# Lq > Lk and Lq < Lk; width 8 is the Dyn-Perceiver z->x path; the tensor cores pad max(dk, dv) to DP = 16 (8),
# 32, 64 (40 / 24) or 128 (72 / 40, 98, 128); multi-tile samples (> 64 queries and keys) in every kernel, causal and not
ATTN = [
    ([5, 0, 1, 300, 129, 700], [170, 3, 0, 300, 64, 64], 4, 2, 64, 64, False),
    ([5, 0, 1, 300, 129, 700], [170, 3, 0, 300, 64, 64], 4, 2, 64, 64, True),
    ([1, 3136, 17], [64, 64, 0], 2, 1, 8, 8, False),
    ([40, 3, 97], [12, 130, 97], 3, 3, 98, 98, True),
    ([128] * 4, [49] * 4, 1, 1, 32, 32, False),
    ([0, 1, 200, 65, 7], [4, 1, 130, 200, 0], 4, 1, 128, 128, True),
    ([0, 1, 200, 65, 7], [4, 1, 130, 200, 0], 4, 1, 128, 128, False),
    ([3, 150, 1, 64], [0, 150, 77, 64], 2, 2, 40, 72, True),
    ([3, 150, 1, 64], [0, 150, 77, 64], 2, 2, 40, 24, False),
]


def patch_problem(dtype, seed):
    """A topk_patch_gather problem in `dtype`: ([images (3, 3, 126, 182), weight (96, 3, 14, 14), bias, pos_embed (117,
    96), scores (3, 117) float32], patch 14); a 9 x 13 patch grid, so rows and columns differ."""
    g = torch.Generator().manual_seed(seed)
    b, c, p, gh, gw, d = 3, 3, 14, 9, 13, 96
    images = torch.randn(b, c, gh * p, gw * p, generator=g)
    weight = torch.randn(d, c, p, p, generator=g) / (c * p)
    bias, pos = torch.randn(d, generator=g), torch.randn(gh * gw, d, generator=g)
    scores = torch.randn(b, gh * gw, generator=g)
    return [t.to(dtype) for t in (images, weight, bias, pos)] + [scores], p


def gather_linear(images, weight, bias, pos_embed, idx, patch):
    """Plain torch for patch_gather_embed: the patches `idx` (B, k) gathered with unfold, a linear layer and the
    positions, every op in the inputs' dtype; (B, k, D)."""
    b, _, _, width = images.shape
    cols = width // patch
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)[torch.arange(b)[:, None], :, idx // cols,
                                                                      idx % cols]
    return F.linear(patches.reshape(b, idx.shape[1], -1), weight.reshape(weight.shape[0], -1), bias) + pos_embed[idx]
