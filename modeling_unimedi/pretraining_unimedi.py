"""UniMedIForPreTraining: attentive slice selection (§3.2), pseudo-pairs in one pass (§3.3) and EMA self-distillation
with attention-guided masking (§3.4), on top of [`UniMedIModel`]."""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_unimedi import UniMedIConfig
from .heads_unimedi import UniMedIDINOHead
from .loss_unimedi import dino_loss, gathered_contrastive_loss, update_center
from .modeling_unimedi import UniMedIModel, UniMedIPreTrainedModel, UniMedIVisionModel


@dataclass
class UniMedIForPreTrainingOutput(ModelOutput):
    r"""
    loss: weighted sum of the components below (the ones the config enables).
    vl_loss, icl_loss, pcl_loss: L_vl (CLIP, whole mixed batch), L_icl (DINO on [CLS]), L_pcl (DINO on patch tokens).
    logits_per_image: (num_images + num_volumes, num_texts) student similarities, X-rays first.
    image_embeds, volume_embeds, text_embeds: normalised student embeddings.
    slab_scores: (num_volumes, num_slabs) Eq. 2 relevance of each depth slab (attentive selection only).
    selected_slabs: (num_volumes, k) depth-slab indices turned into pseudo-2D images, highest score first.
    image_keep_mask: (num_images, num_patches) bool, the X-ray tokens the student saw.
    volume_keep_mask: (num_volumes, num_3d_tokens + k * num_2d_tokens) bool, the CT+slice tokens the student saw.
    """

    loss: torch.FloatTensor | None = None
    vl_loss: torch.FloatTensor | None = None
    icl_loss: torch.FloatTensor | None = None
    pcl_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    volume_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    slab_scores: torch.FloatTensor | None = None
    selected_slabs: torch.LongTensor | None = None
    image_keep_mask: torch.BoolTensor | None = None
    volume_keep_mask: torch.BoolTensor | None = None


def slab_scores_from_attention(cls_attention: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Eq. 2: average the [CLS] attention (Eq. 1) of the tokens of each depth slab. Returns (batch, grid_depth)."""
    depth, height, width = grid
    return cls_attention[:, : depth * height * width].reshape(-1, depth, height * width).mean(dim=-1)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.LongTensor:
    """Indices of the k highest scores per row, highest first."""
    return scores.topk(k, dim=-1).indices


def slab_central_slices(volume_values: torch.Tensor, slabs: torch.LongTensor, patch_depth: int) -> torch.Tensor:
    """The central axial slice of each selected slab: (B, C, D, H, W), (B, k) -> (B, k, C, H, W)."""
    depth_index = slabs * patch_depth + patch_depth // 2
    batch, channels, _, height, width = volume_values.shape
    index = depth_index[:, None, :, None, None].expand(batch, channels, -1, height, width)
    return volume_values.gather(2, index).transpose(1, 2)


def slices_to_images(slices: torch.Tensor, image_size: int, num_channels: int) -> torch.Tensor:
    """Pseudo-2D images for T_2D: resize each (grayscale) slice to the 2D input size and replicate to the 2D channels.

    CT volumes and X-rays share the processors' intensity convention ([0, 1] normalised to [-1, 1] by default), so no
    renormalisation is needed.
    """
    batch, k = slices.shape[:2]
    flat = slices.flatten(0, 1).mean(dim=1, keepdim=True)
    images = F.interpolate(flat, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.expand(-1, num_channels, -1, -1).unflatten(0, (batch, k))


def keep_mask(indices: torch.LongTensor, num_tokens: int) -> torch.BoolTensor:
    mask = torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


class UniMedIForPreTraining(UniMedIPreTrainedModel):
    """Student `UniMedIModel` + (when self-distillation is on) an EMA teacher of the vision encoder and both heads.

    One `forward` takes a mixed batch (X-rays and CTs with one report each, X-rays' reports first) and returns every
    loss component. Call `update_teacher(total_steps)` after each optimizer step. The saved folder also loads as a
    plain `UniMedIModel` (teacher and heads are left out), which is the inference path.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__(config)
        self.unimedi = UniMedIModel._from_config(config)
        if config.self_distillation:
            self.cls_head = UniMedIDINOHead(config)
            self.patch_head = UniMedIDINOHead(config)
            self.teacher_vision_model = UniMedIVisionModel._from_config(config.vision_config)
            self.teacher_cls_head = UniMedIDINOHead(config)
            self.teacher_patch_head = UniMedIDINOHead(config)
            self.register_buffer("cls_center", torch.zeros(1, config.dino_out_dim))
            self.register_buffer("patch_center", torch.zeros(1, config.dino_out_dim))
        self.register_buffer("num_teacher_updates", torch.zeros((), dtype=torch.long))
        self.post_init()
        self.reset_teacher()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            for name in ("cls_center", "patch_center", "num_teacher_updates"):
                if hasattr(self, name):
                    getattr(self, name).zero_()

    # ------------------------------------------------------------------ teacher

    def _teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.config.self_distillation:
            return []
        return [
            (self.unimedi.vision_model, self.teacher_vision_model),
            (self.cls_head, self.teacher_cls_head),
            (self.patch_head, self.teacher_patch_head),
        ]

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Teacher := student, frozen. Done at construction and when a checkpoint carries no teacher."""
        for student, teacher in self._teacher_pairs():
            teacher.load_state_dict(copy.deepcopy(student.state_dict()))
            teacher.requires_grad_(False)

    def ema_momentum(self, total_steps: int) -> float:
        """DINO's cosine schedule from `config.ema_momentum` at step 0 to 1 at `total_steps`."""
        progress = min(int(self.num_teacher_updates), total_steps) / max(total_steps, 1)
        return 1 - (1 - self.config.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2

    def teacher_temperature(self) -> float:
        """Linear warm-up of the teacher temperature (DINO), then constant."""
        warmup = self.config.teacher_temperature_warmup_steps
        if warmup <= 0 or int(self.num_teacher_updates) >= warmup:
            return self.config.teacher_temperature
        progress = int(self.num_teacher_updates) / warmup
        start = self.config.teacher_temperature_warmup
        return start + progress * (self.config.teacher_temperature - start)

    @torch.no_grad()
    def update_teacher(self, total_steps: int) -> float:
        """teacher <- m * teacher + (1 - m) * student, after an optimizer step; returns the momentum m used."""
        momentum = self.ema_momentum(total_steps)
        for student, teacher in self._teacher_pairs():
            student_params = [p.detach() for p in student.parameters()]
            torch._foreach_lerp_(list(teacher.parameters()), student_params, 1 - momentum)
        self.num_teacher_updates += 1
        return momentum

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a checkpoint without teacher weights (e.g. a `UniMedIModel`) gets
        its teacher copied from the student instead of a random one."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if any(key.startswith("teacher_") for key in info["missing_keys"]):
            model.reset_teacher()
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ selection and masking

    @property
    def _scoring_encoder(self) -> UniMedIVisionModel:
        """Whose Eq. 1 attention drives selection: the EMA teacher, or the student (no gradient) without SD."""
        return self.teacher_vision_model if self.config.self_distillation else self.unimedi.vision_model

    def select_slabs(self, volume_values: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Top-k depth slabs per CT by Eq. 1-2 on the scoring encoder, or k random slabs (the VL ablation)."""
        vision_config = self.config.vision_config
        grid = tuple(s // p for s, p in zip(volume_values.shape[2:], vision_config.volume_patch_size))
        k = self.config.num_selected_slices
        if self.config.slice_selection == "random":
            return top_k_indices(torch.rand(volume_values.shape[0], grid[0], device=volume_values.device), k), None
        with torch.no_grad():
            attention = self._scoring_encoder(volume_values=volume_values, output_cls_attention=True).cls_attention
        scores = slab_scores_from_attention(attention, grid)
        return top_k_indices(scores, k), scores

    def tokens_to_keep(
        self, scores: torch.Tensor | None, num_tokens: int, batch: int, device
    ) -> torch.LongTensor | None:
        """Indices (sorted) of the patch tokens the student sees, or None when masking is off."""
        if self.config.token_masking == "none" or self.config.mask_ratio == 0:
            return None
        num_keep = max(1, round(num_tokens * (1 - self.config.mask_ratio)))
        if self.config.token_masking == "random":
            scores = torch.rand(batch, num_tokens, device=device)
        return top_k_indices(scores, num_keep).sort(dim=-1).values

    # ------------------------------------------------------------------ forward

    def _branch(self, pixel_values=None, volume_values=None) -> dict:
        """Teacher/scoring pass on the full input, masking, then the student pass on the kept tokens."""
        needs_scores = self.config.self_distillation or self.config.token_masking == "attentive"
        teacher = None
        if needs_scores:
            with torch.no_grad():
                teacher = self._scoring_encoder(
                    pixel_values=pixel_values, volume_values=volume_values, output_cls_attention=True
                )
        reference = volume_values if volume_values is not None else pixel_values
        num_tokens = self.unimedi.vision_model.num_patch_tokens(pixel_values, volume_values)
        keep = self.tokens_to_keep(
            None if teacher is None else teacher.cls_attention, num_tokens, reference.shape[0], reference.device
        )
        student = self.unimedi.vision_model(
            pixel_values=pixel_values, volume_values=volume_values, keep_token_indices=keep, return_dict=True
        )
        return {"teacher": teacher, "student": student, "keep": keep, "num_tokens": num_tokens}

    def _self_distillation_losses(self, branches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        temperature_s, temperature_t = self.config.student_temperature, self.teacher_temperature()
        student_cls = torch.cat([self.cls_head(b["student"].pooler_output) for b in branches])
        with torch.no_grad():
            teacher_cls = torch.cat([self.teacher_cls_head(b["teacher"].pooler_output) for b in branches])
        icl = dino_loss(student_cls, teacher_cls, self.cls_center, temperature_s, temperature_t)

        pcl_terms, teacher_patches = [], []
        for b in branches:
            student_patches = self.patch_head(b["student"].last_hidden_state[:, 1:])
            with torch.no_grad():
                target_tokens = b["teacher"].last_hidden_state[:, 1:]
                if b["keep"] is not None:
                    target_tokens = target_tokens.gather(
                        1, b["keep"].unsqueeze(-1).expand(-1, -1, target_tokens.shape[-1])
                    )
                target = self.teacher_patch_head(target_tokens)
            pcl_terms.append(
                dino_loss(student_patches, target, self.patch_center, temperature_s, temperature_t) * target.shape[0]
            )
            teacher_patches.append(target.reshape(-1, target.shape[-1]))
        pcl = torch.stack(pcl_terms).sum() / sum(b["student"].pooler_output.shape[0] for b in branches)

        if self.training:
            update_center(self.cls_center, teacher_cls, self.config.center_momentum)
            update_center(self.patch_center, torch.cat(teacher_patches), self.config.center_momentum)
        return icl, pcl

    def _touch_unused_tokenizers(self, loss: torch.Tensor, used: set[str]) -> torch.Tensor:
        """Add 0 x the parameters of tokenizers this batch did not use, so every parameter has a gradient and
        DistributedDataParallel works without `find_unused_parameters` when a rank's share is one modality."""
        vision = self.unimedi.vision_model
        for name in ("image_embeddings", "volume_embeddings"):
            if name not in used:
                loss = loss + 0.0 * sum(p.sum() for p in getattr(vision, name).parameters())
        return loss

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        **kwargs,
    ) -> UniMedIForPreTrainingOutput:
        r"""
        pixel_values (`(num_images, C, H, W)`): X-rays. volume_values (`(num_volumes, 1, D, H, W)`): CTs.
        input_ids / attention_mask / token_type_ids: one report per sample, the X-rays' reports first.
        """
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        num_volumes = 0 if volume_values is None else volume_values.shape[0]
        if num_images + num_volumes == 0:
            raise ValueError("You have to specify `pixel_values`, `volume_values` or both")
        if input_ids.shape[0] != num_images + num_volumes:
            raise ValueError(
                f"Got {num_images} X-ray(s) and {num_volumes} volume(s) but {input_ids.shape[0]} report(s); pass one "
                "report per sample, the X-rays' reports first, then the volumes'"
            )
        vision_config = self.config.vision_config
        branches, used = [], set()
        selected_slabs = slab_scores = None
        if num_images:
            branches.append(self._branch(pixel_values=pixel_values))
            used.add("image_embeddings")
        if num_volumes:
            pseudo_images = None
            if self.config.num_selected_slices > 0:
                selected_slabs, slab_scores = self.select_slabs(volume_values)
                slices = slab_central_slices(volume_values, selected_slabs, vision_config.volume_patch_size[0])
                pseudo_images = slices_to_images(slices, vision_config.image_size, vision_config.num_channels)
                used.add("image_embeddings")
            branches.append(self._branch(pixel_values=pseudo_images, volume_values=volume_values))
            used.add("volume_embeddings")

        text = self.unimedi.get_text_features(input_ids, attention_mask, token_type_ids, return_dict=True)
        vision_embeds = F.normalize(
            self.unimedi.visual_projection(torch.cat([b["student"].pooler_output for b in branches])), dim=-1
        )
        text_embeds = F.normalize(text.pooler_output, dim=-1)
        vl_loss = gathered_contrastive_loss(vision_embeds, text_embeds, self.unimedi.logit_scale)
        loss = self.config.vl_loss_weight * vl_loss
        icl_loss = pcl_loss = None
        if self.config.self_distillation:
            icl_loss, pcl_loss = self._self_distillation_losses(branches)
            loss = loss + self.config.icl_loss_weight * icl_loss + self.config.pcl_loss_weight * pcl_loss
        loss = self._touch_unused_tokenizers(loss, used)

        masks = [None if b["keep"] is None else keep_mask(b["keep"], b["num_tokens"]) for b in branches]
        image_mask = masks[0] if num_images else None
        volume_mask = masks[-1] if num_volumes else None
        return UniMedIForPreTrainingOutput(
            loss=loss,
            vl_loss=vl_loss,
            icl_loss=icl_loss,
            pcl_loss=pcl_loss,
            logits_per_image=self.unimedi.logit_scale.exp() * vision_embeds @ text_embeds.t(),
            image_embeds=vision_embeds[:num_images] if num_images else None,
            volume_embeds=vision_embeds[num_images:] if num_volumes else None,
            text_embeds=text_embeds,
            slab_scores=slab_scores,
            selected_slabs=selected_slabs,
            image_keep_mask=image_mask,
            volume_keep_mask=volume_mask,
        )


__all__ = ["UniMedIForPreTraining", "UniMedIForPreTrainingOutput"]
