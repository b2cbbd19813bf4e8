"""The objective's building blocks against hand computations: L_vl, the DINO loss and centre, the DINO head."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_config

from modeling_unimedi.heads_unimedi import UniMedIDINOHead
from modeling_unimedi.loss_unimedi import dino_loss, gathered_contrastive_loss, update_center


def _normalised(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _manual_clip_loss(images, texts, scale):
    """Per-pair InfoNCE written out element by element: -log(exp(s_ii) / sum_j exp(s_ij)), both directions."""
    n = images.shape[0]
    similarity = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    image_to_text = [-similarity[i][i] + math.log(sum(math.exp(s) for s in similarity[i])) for i in range(n)]
    text_to_image = [-similarity[i][i] + math.log(sum(math.exp(similarity[j][i]) for j in range(n))) for i in range(n)]
    return (sum(image_to_text) + sum(text_to_image)) / (2 * n)


def test_gathered_contrastive_loss_single_process_matches_a_manual_computation():
    images, texts = _normalised(5, 8, seed=1), _normalised(5, 8, seed=2)
    scale = torch.tensor(1 / 0.07)
    loss = gathered_contrastive_loss(images, texts, scale)
    assert loss.item() == pytest.approx(_manual_clip_loss(images, texts, scale.item()), rel=1e-5)
    assert gathered_contrastive_loss(texts, images, scale).item() == pytest.approx(loss.item(), rel=1e-6)


def test_gathered_contrastive_loss_rewards_matching_pairs_and_trains_the_scale():
    texts = _normalised(4, 8, seed=3)
    scale = torch.tensor(10.0, requires_grad=True)
    matched = gathered_contrastive_loss(texts.clone(), texts, scale)
    shuffled = gathered_contrastive_loss(texts.roll(1, dims=0), texts, scale)
    assert matched < shuffled
    matched.backward()
    assert scale.grad is not None and scale.grad < 0  # aligned pairs: a sharper softmax lowers the loss


def _manual_dino_loss(student, teacher, center, student_temperature, teacher_temperature):
    """Cross-entropy H(P_t, P_s) per row, written with exp/log sums, averaged over the rows."""
    losses = []
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])):
        t = torch.exp((t_row - center[0]) / teacher_temperature)
        p_teacher = t / t.sum()
        s = s_row / student_temperature
        log_p_student = s - torch.log(torch.exp(s).sum())
        losses.append(-(p_teacher * log_p_student).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 10)], ids=["cls", "patches"])
def test_dino_loss_matches_a_manual_computation(shape):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    center = torch.randn(1, shape[-1], generator=g) * 0.1
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    assert loss.item() == pytest.approx(_manual_dino_loss(student, teacher, center, 0.1, 0.04).item(), rel=1e-5)


def test_dino_loss_is_minimal_when_the_student_matches_and_sends_no_gradient_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 10, generator=g).requires_grad_()
    center = torch.zeros(1, 10)
    # equal temperatures and a zero centre: student logits = teacher logits give the teacher's entropy, the minimum
    matching = dino_loss(teacher.detach().clone(), teacher, center, 0.1, 0.1)
    other = dino_loss(torch.randn(4, 10, generator=g), teacher, center, 0.1, 0.1)
    assert matching < other
    student = torch.randn(4, 10, generator=g, requires_grad=True)
    dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def test_dino_loss_centre_shifts_the_teacher_target():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    zero = dino_loss(student, teacher, torch.zeros(1, 10), 0.1, 0.04)
    uniform = dino_loss(student, teacher, torch.full((1, 10), 3.0), 0.1, 0.04)
    skewed = dino_loss(student, teacher, torch.linspace(-1, 1, 10)[None], 0.1, 0.04)
    assert uniform.item() == pytest.approx(zero.item(), rel=1e-5)  # softmax ignores a constant shift
    assert skewed.item() != pytest.approx(zero.item(), rel=1e-3)


def test_update_center_is_an_in_place_ema_of_the_mean_over_all_leading_dims():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    center = torch.randn(1, 6, generator=g)
    before = center.clone()
    storage = center.data_ptr()
    update_center(center, teacher, momentum=0.9)
    batch_mean = teacher.detach().reshape(10, 6).sum(dim=0) / 10
    assert torch.allclose(center, 0.9 * before + 0.1 * batch_mean, atol=1e-6)
    assert center.data_ptr() == storage and not center.requires_grad
    update_center(center, teacher, momentum=1.0)
    assert torch.allclose(center, 0.9 * before + 0.1 * batch_mean, atol=1e-6)  # momentum 1 freezes the centre


def _head():
    config = tiny_config(dino_out_dim=12, dino_hidden_dim=16, dino_bottleneck_dim=8)
    torch.manual_seed(0)
    return UniMedIDINOHead(config), config


def test_dino_head_is_a_cosine_against_unit_norm_prototypes():
    head, config = _head()
    hidden = torch.randn(3, 5, config.vision_config.hidden_size)  # patch tokens; [CLS] is the 2D case
    out = head(hidden)
    assert out.shape == (3, 5, config.dino_out_dim)
    bottleneck = head.mlp(hidden)
    prototypes = head.prototypes.weight
    expected = (bottleneck @ prototypes.t()) / (
        bottleneck.norm(dim=-1, keepdim=True) * prototypes.norm(dim=-1)[None, None]
    )
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6
    assert torch.allclose(head(hidden[:, 0]), out[:, 0], atol=1e-6)


def test_dino_head_output_ignores_the_prototype_norms():
    """DINO's weight-normalised last layer with the norm frozen at 1: rescaling a prototype changes nothing."""
    head, config = _head()
    hidden = torch.randn(4, config.vision_config.hidden_size)
    before = head(hidden)
    with torch.no_grad():
        head.prototypes.weight.mul_(torch.linspace(0.5, 3.0, config.dino_out_dim)[:, None])
    assert torch.allclose(head(hidden), before, atol=1e-6)
