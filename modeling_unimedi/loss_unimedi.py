"""Symmetric CLIP loss (L_vl) between visual and report embeddings, optionally with negatives from every rank."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def check_one_report_per_sample(num_samples: int, num_texts: int) -> None:
    """The CLIP loss pairs sample i with report i; scoring alone (no loss) takes any numbers of each."""
    if num_samples != num_texts:
        raise ValueError(
            f"the CLIP loss needs one report per sample (sample i is paired with report i), got {num_samples} "
            f"X-ray(s)/volume(s) and {num_texts} report(s); pass one report per sample, the X-rays' reports first, "
            "then the volumes', or drop `return_loss` to score every sample against every text"
        )


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy for a square (n_images, n_texts) logit matrix."""
    check_one_report_per_sample(*logits_per_image.shape)
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def _gather_keeping_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, detached except this rank's own, whose gradient is multiplied by the world size.

    The gather runs in the forward only, so the backward has no collective to interleave with DDP's all-reduces (ranks
    with different modality mixes reach the loss's backward at different points). Every rank computes the whole
    global loss, so its gradient for its own rows is already the full-batch one; DDP then averages over ranks, which
    the world-size factor undoes: parameters get exactly the single-process full-batch gradient.
    """
    world_size = dist.get_world_size()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[dist.get_rank()] = tensor * world_size - tensor.detach() * (world_size - 1)  # value: tensor
    return torch.cat(gathered, dim=0)


def gathered_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """L_vl over the global batch: negatives from all ranks, no collective in the backward.

    Each rank gathers every rank's (detached) embeddings and computes the global (global x global) loss, the same
    value on every rank; only its own rows carry gradients (see `_gather_keeping_local_grad`). Embeddings must be
    L2-normalised and every rank must hold the same number of samples; `logit_scale` is the exponentiated inverse
    temperature (as open_clip's `ClipLoss` takes it). Without an initialised process group this is the plain loss.
    """
    check_one_report_per_sample(image_embeds.shape[0], text_embeds.shape[0])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return contrastive_loss(logit_scale * image_embeds @ text_embeds.t())
    all_images = _gather_keeping_local_grad(image_embeds)
    all_texts = _gather_keeping_local_grad(text_embeds)
    return contrastive_loss(logit_scale * all_images @ all_texts.t())


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """DINO cross-entropy between the centred, sharpened teacher distribution and the student's, over the last dim.

    Works for [CLS] outputs (batch, dim) (L_icl) and patch outputs (batch, tokens, dim) (L_pcl), averaging over every
    leading dimension. The teacher side carries no gradient.
    """
    teacher_probs = F.softmax((teacher_logits.detach().float() - center) / teacher_temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(teacher_probs * student_log_probs).sum(dim=-1).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """EMA of the teacher outputs' mean over the global batch (all ranks), in place; prevents DINO collapse.

    Left unchanged when no rank had outputs (a modality absent from the whole batch)."""
    flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    total = flat.sum(dim=0, keepdim=True)
    count = torch.tensor(float(flat.shape[0]), device=flat.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    if count > 0:
        center.mul_(momentum).add_(total / count, alpha=1 - momentum)
