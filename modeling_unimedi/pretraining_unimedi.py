"""UniMedIForPreTraining: attentive slice selection (§3.2), pseudo-pairs in one pass (§3.3) and EMA self-distillation
with attention-guided masking and patch recovery (§3.4), on top of [`UniMedIModel`]."""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_unimedi import UniMedIConfig
from .heads_unimedi import UniMedIDINOHead
from .loss_unimedi import dino_loss, gathered_contrastive_loss, update_center
from .modeling_unimedi import (
    UniMedICommonSpace,
    UniMedIModel,
    UniMedIPreTrainedModel,
    UniMedIVisionModel,
    UniMedIVisionModelOutput,
)
from .predictor_unimedi import UniMedIMaskToken, UniMedIPatchPredictor, patch_positions
from .slices_unimedi import pseudo_images, top_k_indices


@dataclass
class UniMedIForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        Weighted sum of the components below that the config enables.
    vl_loss (`torch.FloatTensor` of shape `()`):
        L_vl, the CLIP loss over the whole mixed batch (negatives from every rank under DDP).
    icl_loss (`torch.FloatTensor` of shape `()`, *optional*):
        L_icl, DINO on the [CLS] outputs; None without self-distillation.
    pcl_loss (`torch.FloatTensor` of shape `()`, *optional*):
        L_pcl, DINO between the student's recovered patch states and the teacher's at the masked positions (also
        the kept ones with `pcl_on_kept_tokens`; every position without masking); None without self-distillation.
    logits_per_image (`torch.FloatTensor` of shape `(num_images + num_volumes, num_texts)`):
        The student's scaled similarities, X-rays first.
    image_embeds (`torch.FloatTensor` of shape `(num_images, projection_dim)`, *optional*):
        Normalised student X-ray embeddings.
    volume_embeds (`torch.FloatTensor` of shape `(num_volumes, projection_dim)`, *optional*):
        Normalised student CT embeddings (each CT with its pseudo-2D slices in one sequence).
    text_embeds (`torch.FloatTensor` of shape `(num_texts, projection_dim)`):
        Normalised report embeddings.
    slab_scores (`torch.FloatTensor` of shape `(num_volumes, num_depth_slabs)`, *optional*):
        Eq. 2 relevance of each depth slab; attentive selection only.
    selected_slabs (`torch.LongTensor` of shape `(num_volumes, num_selected_slices)`, *optional*):
        Depth-slab indices turned into pseudo-2D images, highest score first.
    image_keep_mask (`torch.BoolTensor` of shape `(num_images, num_2d_tokens)`, *optional*):
        The X-ray tokens the student saw; None without masking.
    volume_keep_mask (`torch.BoolTensor` of shape `(num_volumes, num_3d_tokens + k * num_2d_tokens)`, *optional*):
        The CT and pseudo-2D slice tokens the student saw (k = `num_selected_slices`), `1 - mask_ratio` of each
        modality's; None without masking.
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


# DINO centres per modality (`center_prefix`): X-rays keep the names of the one centre older runs shared, CTs get
# their own, so older checkpoints load by name (a missing CT centre starts from the shared one or from zero).
CENTER_PREFIXES = ("", "volume_")
CENTER_NAMES = tuple(prefix + kind for prefix in CENTER_PREFIXES for kind in ("cls_center", "patch_center"))

# Old layout (before the student/teacher ModuleDicts) -> new layout. `from_pretrained` passes it as transformers'
# `key_mapping`; plain `load_state_dict` (resuming an accelerate checkpoint) applies it through a pre-hook.
LEGACY_KEY_MAPPING = {
    r"^teacher_vision_model\.": "teacher.backbone.",
    r"^teacher_cls_head\.": "teacher.cls_head.",
    r"^teacher_patch_head\.": "teacher.patch_head.",
    r"^cls_head\.": "student.cls_head.",
    r"^patch_head\.": "student.patch_head.",
}


def rename_legacy_key(key: str) -> str:
    """A state-dict key of the old layout in the new one (other keys unchanged)."""
    for old, new in LEGACY_KEY_MAPPING.items():
        key = re.sub(old, new, key)
    return key


@dataclass
class VisionBranch:
    """One modality's pass: the teacher/scoring encoder on the full input, the student on the tokens it keeps.

    `teacher` is None when neither self-distillation nor attentive masking needs it; `kept_tokens` (batch, num_kept)
    holds sorted indices into the `num_tokens` patch tokens, None without masking. `recovered_patches`
    (batch, num_tokens, hidden) is the student's state at every patch position (the predictor's output, or the
    mask-token pass), None without masking or self-distillation. `pcl_positions` (batch, num_positions): where L_pcl
    is taken, None for every position. `tokenizers` names the student's patch embeddings the pass used.
    """

    student: UniMedIVisionModelOutput
    teacher: UniMedIVisionModelOutput | None
    kept_tokens: torch.LongTensor | None
    num_tokens: int
    tokenizers: tuple[str, ...]
    recovered_patches: torch.Tensor | None = None
    pcl_positions: torch.LongTensor | None = None

    def keep_mask(self) -> torch.BoolTensor | None:
        """(batch, num_tokens) bool, True where the student saw the token; None without masking."""
        if self.kept_tokens is None:
            return None
        mask = torch.zeros(
            self.kept_tokens.shape[0], self.num_tokens, dtype=torch.bool, device=self.kept_tokens.device
        )
        return mask.scatter_(1, self.kept_tokens, True)

    def student_patch_states(self) -> torch.Tensor:
        """The student's patch states that L_pcl compares with the teacher's."""
        if self.kept_tokens is None:
            return self.student.last_hidden_state[:, 1:]
        return gather_tokens(self.recovered_patches, self.pcl_positions)

    def teacher_patch_tokens(self) -> torch.Tensor:
        """The teacher's patch tokens at the positions L_pcl is taken at: its targets."""
        return gather_tokens(self.teacher.last_hidden_state[:, 1:], self.pcl_positions)


def gather_tokens(tokens: torch.Tensor, indices: torch.LongTensor | None) -> torch.Tensor:
    """tokens (batch, N, hidden) at indices (batch, M); all of them when indices is None."""
    if indices is None:
        return tokens
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class DistillationTargets:
    """The teacher heads' outputs: what L_icl and L_pcl pull the student towards, and what the DINO centres track.

    One tensor per branch (X-rays first): `cls` (batch, dino_out_dim), `patches` (batch, num_positions,
    dino_out_dim) at the branch's `pcl_positions`.
    """

    cls: list[torch.Tensor]
    patches: list[torch.Tensor]


def center_prefix(branch: "VisionBranch") -> str:
    """Name prefix of the DINO centres a branch is centred with: "" for X-rays, "volume_" for CTs (with their
    pseudo-images).

    A mixed batch holds 3x more X-rays than CTs (the demo's 12 + 4); one shared centre follows the X-ray outputs,
    and with it the CT embeddings collapsed in 4 of 6 benchmark runs (README, "Ground-truth benchmark")."""
    return CENTER_PREFIXES["volume_embeddings" in branch.tokenizers]


class UniMedIForPreTraining(UniMedIPreTrainedModel):
    """Student `UniMedIModel` + (when self-distillation is on) an EMA teacher of the vision encoder and both heads.

    As DINOv2 holds them: `student` has the DINO heads and the patch recovery (`patch_predictor` or `mask_token`,
    see `UniMedIConfig.patch_recovery`), `teacher` the EMA copies of the backbone and heads. The
    student's backbone is `unimedi.vision_model`, the inference model's own, so a saved folder also loads as a plain
    `UniMedIModel` (teacher and heads are left out); registering it again under `student` would save it twice.

    One `forward` takes a mixed batch (X-rays and CTs with one report each, X-rays' reports first) and returns every
    loss component. The training loop owns the schedules (`training/schedules.py`): it passes the teacher temperature
    to `forward` and calls `update_teacher(momentum)` after each optimizer step.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__(config)
        self.unimedi = UniMedIModel._from_config(config)
        self.student = nn.ModuleDict()
        self.teacher = nn.ModuleDict()
        if config.self_distillation:
            self.student.update({"cls_head": UniMedIDINOHead(config), "patch_head": UniMedIDINOHead(config)})
            if config.patch_recovery == "predictor":
                self.student["patch_predictor"] = UniMedIPatchPredictor(config)
            else:
                self.student["mask_token"] = UniMedIMaskToken(config)
            self.teacher.update(
                {
                    "backbone": UniMedIVisionModel._from_config(config.vision_config),
                    "cls_head": UniMedIDINOHead(config),
                    "patch_head": UniMedIDINOHead(config),
                }
            )
            for name in CENTER_NAMES:
                self.register_buffer(name, torch.zeros(1, config.dino_out_dim))
        self.register_buffer("num_teacher_updates", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(self._rename_legacy_keys)
        self.post_init()
        self.reset_teacher()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, UniMedIMaskToken):
            init.trunc_normal_(module.embedding, std=self.config.vision_config.initializer_range)
        if module is self:
            for name in (*CENTER_NAMES, "num_teacher_updates"):
                if hasattr(self, name):
                    init.zeros_(getattr(self, name))  # leaves a buffer the checkpoint loaded

    @staticmethod
    def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            renamed = prefix + rename_legacy_key(key[len(prefix) :])
            if renamed != key:
                state_dict[renamed] = state_dict.pop(key)
        for kind in ("cls_center", "patch_center"):  # older runs: one centre shared by both modalities
            if prefix + kind in state_dict and prefix + "volume_" + kind not in state_dict:
                state_dict[prefix + "volume_" + kind] = state_dict[prefix + kind].clone()

    # ------------------------------------------------------------------ teacher

    def student_modules(self) -> dict[str, nn.Module]:
        """The student's parts under the teacher's names: the EMA pairs (the patch recovery has no teacher copy)."""
        return {"backbone": self.unimedi.vision_model, **self.student}

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Teacher := student, frozen. Done at construction and when a checkpoint carries no teacher."""
        student = self.student_modules()
        for name, teacher in self.teacher.items():
            teacher.load_state_dict(student[name].state_dict())
            teacher.requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, after an optimizer step; counts the update
        (`num_teacher_updates`, the step the training loop's schedules read, saved with the model for exact resume)."""
        student = self.student_modules()
        teacher_params = list(self.teacher.parameters())
        if teacher_params:
            student_params = [p.detach() for name in self.teacher for p in student[name].parameters()]
            torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)
        self.num_teacher_updates += 1

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """As `PreTrainedModel.from_pretrained`, also for checkpoints in the layout before `student`/`teacher`
        (`LEGACY_KEY_MAPPING`); a checkpoint without teacher weights (e.g. a `UniMedIModel`) gets its teacher copied
        from the student instead of a random one."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            *args, key_mapping={**LEGACY_KEY_MAPPING, **(key_mapping or {})}, output_loading_info=True, **kwargs
        )
        if any(key.startswith("teacher.") for key in info["missing_keys"]):
            model.reset_teacher()
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ selection and masking

    @property
    def _scoring_encoder(self) -> UniMedIVisionModel:
        """Whose Eq. 1 attention drives selection: the EMA teacher, or the student (no gradient) without SD."""
        return self.teacher["backbone"] if self.config.self_distillation else self.unimedi.vision_model

    def select_slabs(self, volume_values: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Top-k depth slabs per CT by Eq. 1-2 on the scoring encoder (and their scores), or k random slabs (the VL
        ablation; no scores)."""
        k = self.config.num_selected_slices
        if self.config.slice_selection == "random":
            num_slabs = volume_values.shape[2] // self.config.vision_config.volume_patch_size[0]
            return top_k_indices(torch.rand(volume_values.shape[0], num_slabs, device=volume_values.device), k), None
        with torch.no_grad():
            scores = self._scoring_encoder.slab_scores(volume_values)
        return top_k_indices(scores, k), scores

    def tokens_to_keep(
        self, scores: torch.Tensor | None, modality_sizes: list[int], batch: int, device
    ) -> torch.LongTensor | None:
        """Indices (sorted) of the patch tokens the student sees, or None when masking is off. The sequence is the
        concatenation of one block per modality (`modality_sizes`, e.g. 3D tokens then slice tokens); each block keeps
        `1 - mask_ratio` of its own tokens (§3.4 masks both 2D and 3D tokens)."""
        if self.config.token_masking == "none" or self.config.mask_ratio == 0:
            return None
        if self.config.token_masking == "random":
            scores = torch.rand(batch, sum(modality_sizes), device=device)
        kept, start = [], 0
        for size in modality_sizes:
            num_keep = max(1, round(size * (1 - self.config.mask_ratio)))
            kept.append(top_k_indices(scores[:, start : start + size], num_keep) + start)
            start += size
        return torch.cat(kept, dim=1).sort(dim=-1).values

    # ------------------------------------------------------------------ forward steps

    def forward_branch(self, pixel_values=None, volume_values=None) -> VisionBranch:
        """Teacher/scoring pass on the full input, masking per modality, the student pass, and (with
        self-distillation) the student's recovery of the masked patches."""
        teacher = None
        if self.config.self_distillation or self.config.token_masking == "attentive":
            with torch.no_grad():
                teacher = self._scoring_encoder(
                    pixel_values=pixel_values, volume_values=volume_values, output_cls_attention=True
                )
        vision = self.unimedi.vision_model
        reference = volume_values if volume_values is not None else pixel_values
        modality_sizes = [
            vision.num_patch_tokens(volume_values=volume_values) if volume_values is not None else 0,
            vision.num_patch_tokens(pixel_values=pixel_values) if pixel_values is not None else 0,
        ]
        kept = self.tokens_to_keep(
            None if teacher is None else teacher.cls_attention,
            [size for size in modality_sizes if size],
            reference.shape[0],
            reference.device,
        )
        inputs = {"image_embeddings": pixel_values, "volume_embeddings": volume_values}
        tokenizers = tuple(name for name, values in inputs.items() if values is not None)
        branch = VisionBranch(None, teacher, kept, sum(modality_sizes), tokenizers)
        recover = kept is not None and self.config.self_distillation
        if recover and self.config.patch_recovery == "mask_token":
            branch.student = self.encode_with_mask_tokens(pixel_values, volume_values, branch.keep_mask())
            branch.recovered_patches = branch.student.last_hidden_state[:, 1:]
        else:
            branch.student = vision(
                pixel_values=pixel_values, volume_values=volume_values, keep_token_indices=kept, return_dict=True
            )
        if recover and self.config.patch_recovery == "predictor":
            positions = patch_positions(vision, pixel_values, volume_values)
            branch.recovered_patches = self.student["patch_predictor"](
                branch.student.last_hidden_state, kept, branch.keep_mask(), positions
            )
        if recover and not self.config.pcl_on_kept_tokens:
            masked = ~branch.keep_mask()
            branch.pcl_positions = masked.nonzero()[:, 1].view(masked.shape[0], -1)  # row-major: sorted per row
        return branch

    def encode_with_mask_tokens(
        self, pixel_values: torch.Tensor | None, volume_values: torch.Tensor | None, keep_mask: torch.BoolTensor
    ) -> UniMedIVisionModelOutput:
        """iBOT's student pass: the full sequence, the mask token (plus position) at every masked position."""
        vision = self.unimedi.vision_model
        tokens = vision.embed_patches(pixel_values, volume_values)
        tokens = self.student["mask_token"](tokens, keep_mask, patch_positions(vision, pixel_values, volume_values))
        hidden_states = torch.cat([vision.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        hidden_states = vision.post_layernorm(vision.encoder(hidden_states)[0])
        return UniMedIVisionModelOutput(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])

    def forward_volumes(
        self, volume_values: torch.Tensor, slab_images: torch.Tensor | None = None
    ) -> tuple[VisionBranch, torch.LongTensor | None, torch.Tensor | None]:
        """§3.2-3.3: select k depth slabs, turn their slices into pseudo-2D images, and run the CT with its
        pseudo-images as one sequence. Returns the branch, the selected slabs and their Eq. 2 scores (or None)."""
        slabs = scores = slab_pseudo_images = None
        if self.config.num_selected_slices > 0:
            slabs, scores = self.select_slabs(volume_values)
            slab_pseudo_images = pseudo_images(self.config, volume_values, slabs, slab_images)
        return self.forward_branch(pixel_values=slab_pseudo_images, volume_values=volume_values), slabs, scores

    @torch.no_grad()
    def forward_targets(self, branches: list[VisionBranch]) -> DistillationTargets:
        """The teacher heads on the teacher's full-view outputs: [CLS], and the patch tokens at L_pcl's positions."""
        return DistillationTargets(
            cls=[self.teacher["cls_head"](b.teacher.pooler_output) for b in branches],
            patches=[self.teacher["patch_head"](b.teacher_patch_tokens()) for b in branches],
        )

    def forward_distillation_loss(
        self, branches: list[VisionBranch], targets: DistillationTargets, teacher_temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_icl on the [CLS] outputs and L_pcl on the recovered patch states (per-sample averages over branches),
        each branch's teacher centred with its modality's centre.

        During the first `prototype_freeze_steps` the heads' prototypes get no gradient (DINO's last-layer freeze).
        """
        freeze = self.training and int(self.num_teacher_updates) < self.config.prototype_freeze_steps
        temperatures = (self.config.student_temperature, teacher_temperature)
        icl_terms, pcl_terms = [], []
        for branch, cls_target, patch_target in zip(branches, targets.cls, targets.patches):
            prefix, batch = center_prefix(branch), cls_target.shape[0]
            cls_center, patch_center = getattr(self, prefix + "cls_center"), getattr(self, prefix + "patch_center")
            student_cls = self.student["cls_head"](branch.student.pooler_output, freeze_prototypes=freeze)
            icl_terms.append(batch * dino_loss(student_cls, cls_target, cls_center, *temperatures))
            student_patches = self.student["patch_head"](branch.student_patch_states(), freeze_prototypes=freeze)
            pcl_terms.append(batch * dino_loss(student_patches, patch_target, patch_center, *temperatures))
        num_samples = sum(target.shape[0] for target in targets.cls)
        return torch.stack(icl_terms).sum() / num_samples, torch.stack(pcl_terms).sum() / num_samples

    def update_centers(self, branches: list[VisionBranch], targets: DistillationTargets) -> None:
        """EMA of each modality's DINO centres towards this batch's teacher outputs of that modality (after the
        losses used the current ones). Every centre is updated on every rank, with no outputs where a rank's share
        lacks the modality, so the ranks' all-reduces stay in step."""
        prefixes = [center_prefix(branch) for branch in branches]
        for prefix in CENTER_PREFIXES:
            for kind, outputs in (("cls_center", targets.cls), ("patch_center", targets.patches)):
                center = getattr(self, prefix + kind)
                mine = [o.reshape(-1, o.shape[-1]) for p, o in zip(prefixes, outputs) if p == prefix]
                flat = torch.cat(mine) if mine else center.new_zeros(0, center.shape[-1])
                update_center(center, flat, self.config.center_momentum)

    def _touch_unused_tokenizers(self, loss: torch.Tensor, branches: list[VisionBranch]) -> torch.Tensor:
        """Add 0 x the parameters of tokenizers this batch did not use, so every parameter has a gradient and
        DistributedDataParallel works without `find_unused_parameters` when a rank's share is one modality."""
        used = {name for b in branches for name in b.tokenizers}
        vision = self.unimedi.vision_model
        unused = [getattr(vision, name) for name in ("image_embeddings", "volume_embeddings") if name not in used]
        if self.config.self_distillation:  # the frozen prototypes and an unused predictor (no masking)
            unused += [self.student["cls_head"].prototypes, self.student["patch_head"].prototypes]
            unused += [m for name, m in self.student.items() if name not in ("cls_head", "patch_head")]
        for module in unused:
            loss = loss + 0.0 * sum(p.sum() for p in module.parameters())
        return loss

    def forward_loss(
        self,
        space: UniMedICommonSpace,
        branches: list[VisionBranch],
        targets: DistillationTargets | None,
        teacher_temperature: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The weighted total and its components L_vl, L_icl, L_pcl (the last two None without self-distillation)."""
        vl_loss = gathered_contrastive_loss(space.vision_embeds, space.text_embeds, space.logit_scale)
        loss, icl_loss, pcl_loss = self.config.vl_loss_weight * vl_loss, None, None
        if targets is not None:
            temperature = self.config.teacher_temperature if teacher_temperature is None else teacher_temperature
            icl_loss, pcl_loss = self.forward_distillation_loss(branches, targets, temperature)
            loss = loss + self.config.icl_loss_weight * icl_loss + self.config.pcl_loss_weight * pcl_loss
        return self._touch_unused_tokenizers(loss, branches), vl_loss, icl_loss, pcl_loss

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        slab_images: torch.Tensor | None = None,
        teacher_temperature: float | None = None,
        **kwargs,
    ) -> UniMedIForPreTrainingOutput:
        r"""
        pixel_values (`(num_images, C, H, W)`): X-rays. volume_values (`(num_volumes, 1, D, H, W)`): CTs.
        input_ids / attention_mask / token_type_ids: one report per sample, the X-rays' reports first.
        slab_images (`(num_volumes, num_depth_slabs, 1, H, W)`, *optional*): each CT's native slab images (the
            collator's, from stored shards); the pseudo-2D images with `pseudo_image_source="native"`.
        teacher_temperature (`float`, *optional*): this step's DINO teacher temperature (the training loop's
            warm-up schedule); defaults to `config.teacher_temperature`.
        """
        with torch.no_grad():  # CLIP's clip of the inverse temperature (`max_logit_scale`)
            self.unimedi.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))
        image_branch = None if pixel_values is None else self.forward_branch(pixel_values=pixel_values)
        volume_branch, slabs, scores = (
            (None, None, None) if volume_values is None else self.forward_volumes(volume_values, slab_images)
        )
        branches = [b for b in (image_branch, volume_branch) if b is not None]
        space = self.unimedi.embed_batch(
            input_ids,
            attention_mask,
            token_type_ids,
            image_states=None if image_branch is None else image_branch.student.pooler_output,
            volume_states=None if volume_branch is None else volume_branch.student.pooler_output,
        )
        targets = self.forward_targets(branches) if self.config.self_distillation else None
        loss, vl_loss, icl_loss, pcl_loss = self.forward_loss(space, branches, targets, teacher_temperature)
        if self.training and targets is not None:
            self.update_centers(branches, targets)
        num_images = 0 if image_branch is None else pixel_values.shape[0]
        return UniMedIForPreTrainingOutput(
            loss=loss,
            vl_loss=vl_loss,
            icl_loss=icl_loss,
            pcl_loss=pcl_loss,
            logits_per_image=space.logits_per_image,
            image_embeds=space.vision_embeds[:num_images] if image_branch is not None else None,
            volume_embeds=space.vision_embeds[num_images:] if volume_branch is not None else None,
            text_embeds=space.text_embeds,
            slab_scores=scores,
            selected_slabs=slabs,
            image_keep_mask=None if image_branch is None else image_branch.keep_mask(),
            volume_keep_mask=None if volume_branch is None else volume_branch.keep_mask(),
        )


__all__ = ["UniMedIForPreTraining", "UniMedIForPreTrainingOutput"]
