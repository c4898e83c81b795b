"""MedBLIP's contrastive losses and the gathers that give them the global batch in distributed training.

Pure functions of tensors; the model (`modeling_medblip.py`) supplies the features, the temperature and the weights.
"""

import torch
import torch.nn.functional as F


def is_distributed() -> bool:
    """torch.distributed is running with several processes."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every process's gradient of the gathered rows and keeps this process's own
    (LAVIS's GatherLayer). Not `torch.distributed.nn.functional.all_gather`: on gloo its backward (an all-to-all)
    reads non-contiguous gradients, such as those of the text features, in the wrong order."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.contiguous()
        torch.distributed.all_reduce(gradient)
        rows = gradient.shape[0] // torch.distributed.get_world_size()
        return gradient[torch.distributed.get_rank() * rows:(torch.distributed.get_rank() + 1) * rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order, with gradients flowing back to each process's own rows (as
    BLIP-2 does); `tensor` itself outside distributed training. Per-process batches must have equal sizes."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_token_rows(
    input_ids: torch.LongTensor, attention_mask: torch.LongTensor, gather: bool = True
) -> torch.Tensor:
    """`(global_batch, 2 * length)`: every process's ids and mask side by side, right-padded to a common length
    (only this process's rows when `gather` is False or outside distributed training)."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids)], 1)
    if not (gather and is_distributed()):
        return rows
    length = torch.tensor(input_ids.shape[1], device=input_ids.device)
    torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
    pad = int(length) - input_ids.shape[1]
    rows = torch.cat([F.pad(input_ids, (0, pad)), F.pad(attention_mask.to(input_ids), (0, pad))], 1)
    gathered = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, rows)
    return torch.cat(gathered, dim=0)


def image_text_similarity(image_features: torch.Tensor, text_features: torch.Tensor,
                          temperature: torch.Tensor) -> torch.Tensor:
    """`(B_img, B_txt)` logits: the best-matching query per pair (as in BLIP-2), divided by `temperature`.

    `image_features` `(B_img, Q, D)` and `text_features` `(B_txt, D)` are L2-normalized.
    """
    similarity = torch.einsum("iqd,td->itq", image_features, text_features).amax(dim=-1)
    return similarity / temperature


def contrastive_loss(similarity: torch.Tensor, positives: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Symmetric soft-target cross-entropy: each row's target is uniform over its positives, then smoothed.

    `positives` is a boolean `(B_img, B_txt)` matrix with at least one True per row and per column (the diagonal
    for image-text pairs; same-answer pairs for image-answer pairs, so that a batch's few distinct answers are
    never each other's negatives).
    """

    def one_direction(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        target = positive_mask.float() / positive_mask.float().sum(dim=1, keepdim=True)
        target = (1 - label_smoothing) * target + label_smoothing / logits.shape[1]
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    return (one_direction(similarity, positives) + one_direction(similarity.t(), positives.t())) / 2


__all__ = ["contrastive_loss", "gather_token_rows", "gather_with_grad", "image_text_similarity", "is_distributed"]
