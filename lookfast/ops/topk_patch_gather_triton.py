"""The Triton backend of the top-k patch gather as `torch.library.triton_op`s, so torch.compile traces the kernels and
autograd reaches them. Used for CUDA tensors when `_dispatch.backend_for` picks Triton. Importing this needs triton."""
from __future__ import annotations

from typing import Optional

import torch

from lookfast.kernels import topk_patch_gather as _kernels


@torch.library.triton_op("lookfast::topk_indices_triton", mutates_args=())
def topk_indices_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _kernels.topk_indices(scores, k)


@torch.library.triton_op("lookfast::patch_gather_embed_triton", mutates_args=())
def patch_gather_embed_triton(images: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    return _kernels.patch_gather_embed(images, indices, cu_seqlens, patch_size, weight, bias, pos_embed)


@torch.library.triton_op("lookfast::patch_gather_embed_backward_triton", mutates_args=())
def patch_gather_embed_backward_triton(grad_tokens: torch.Tensor, images: torch.Tensor, indices: torch.Tensor,
                                       cu_seqlens: torch.Tensor, patch_size: int, weight: Optional[torch.Tensor],
                                       pos_embed: Optional[torch.Tensor], output_mask: list[bool]
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.patch_gather_embed_backward(grad_tokens, images, indices, cu_seqlens, patch_size, weight,
                                                pos_embed, output_mask)
