"""`center_text_projection`: the text projection starts without the frozen report encoder's common [CLS] direction."""

import pytest
import torch
import torch.nn.functional as F
from test_training import fabricated_shards, tiny_run_args
from tiny_configs import TINY_TEXT, minilm_path
from transformers import AutoTokenizer, BertConfig, BertModel

from training.config import load_config
from training.text_projection import mean_text_direction, remove_direction, training_reports

REPORTS = ["No effusion.", "Small left pleural effusion.", "Nodule in the right upper lobe.", "Lungs are clear."]


def test_removed_direction_maps_to_zero_and_the_rest_is_kept():
    torch.manual_seed(0)
    projection = torch.nn.Linear(8, 4, bias=False)
    direction = F.normalize(torch.randn(8), dim=0)
    other = torch.randn(8)
    other -= (other @ direction) * direction  # orthogonal to the direction
    before = projection(other)
    remove_direction(projection, direction)
    assert projection(direction).abs().max() < 1e-6
    torch.testing.assert_close(projection(other), before)


def test_mean_direction_is_the_normalised_mean_cls_state_and_dropout_mode_is_restored():
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(**dict(TINY_TEXT, vocab_size=30522, hidden_dropout_prob=0.5)), add_pooling_layer=False
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoder.train()
    direction = mean_text_direction(encoder, tokenizer, REPORTS, max_length=16)
    assert encoder.training  # the caller's mode comes back
    encoder.eval()
    with torch.no_grad():
        states = [encoder(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 0] for text in REPORTS]
    torch.testing.assert_close(direction, F.normalize(torch.stack(states).mean(0), dim=0), atol=1e-5, rtol=1e-5)


def test_reports_come_from_both_modalities_shards_and_a_hub_dataset_is_refused(tmp_path):
    data = fabricated_shards(tmp_path / "data")
    reports = training_reports(str(data), "train", limit=8)
    assert len(reports) == 8
    assert any(text.startswith("X-ray") for text in reports) and any(text.startswith("CT") for text in reports)
    with pytest.raises(ValueError, match="not a local folder"):
        training_reports("some-org/some-dataset", "train", limit=8)


def test_centred_projection_spreads_the_report_embeddings(tmp_path):
    """Through the pretraining builders: the mean report state maps to ~0 and reports embed less alike."""
    from accelerate.utils import set_seed

    from training.pretrain import build_model, build_processor, center_text_projection

    data = fabricated_shards(tmp_path / "data")
    config = load_config(None, tiny_run_args(data, tmp_path / "out", center_text_projection="true"))
    assert config.center_text_projection
    set_seed(0)
    model = build_model(config)
    processor = build_processor(config, model.config)
    reports = training_reports(str(data), "train", limit=256)
    tokens = processor.tokenizer(reports, padding=True, truncation=True, max_length=16, return_tensors="pt")

    def report_embeddings():
        model.eval()
        with torch.no_grad():
            return F.normalize(model.unimedi.get_text_features(**tokens).pooler_output, dim=-1)

    def mean_pairwise_cosine(embeddings):
        similarity = embeddings @ embeddings.T
        return (similarity.sum() - similarity.diagonal().sum()) / (len(embeddings) * (len(embeddings) - 1))

    before = mean_pairwise_cosine(report_embeddings())
    center_text_projection(model, processor, config)
    after = mean_pairwise_cosine(report_embeddings())
    direction = mean_text_direction(model.unimedi.text_model, processor.tokenizer, reports, config.max_length)
    assert model.unimedi.text_projection(direction).abs().max() < 1e-5
    assert after < before - 0.1, (before, after)


def test_a_locked_text_projection_keeps_its_weights_while_the_rest_trains():
    """`text_projection_learning_rate=0`: AdamW (with its decoupled weight decay) leaves the projection as it was."""
    from tiny_configs import tiny_config

    from modeling_unimedi import UniMedIForPreTraining
    from training.pretrain import optimizer_groups

    torch.manual_seed(0)
    model = UniMedIForPreTraining(tiny_config())
    groups = optimizer_groups(model, 1e-3, 0.05, text_learning_rate=3e-5, text_projection_learning_rate=0.0)
    rates = {id(param): group["lr"] for group in groups for param in group["params"]}
    assert rates[id(model.unimedi.text_projection.weight)] == 0.0
    assert rates[id(model.unimedi.visual_projection.weight)] == 1e-3
    assert rates[id(model.unimedi.text_model.embeddings.word_embeddings.weight)] == 3e-5
    before = {name: param.detach().clone() for name, param in model.unimedi.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    for _ in range(2):
        model.unimedi.text_projection.weight.sum().backward()  # a gradient the locked rate must ignore
        sum(param.sum() for param in model.unimedi.visual_projection.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(model.unimedi.text_projection.weight, before["text_projection.weight"], rtol=0, atol=0)
    assert not torch.equal(model.unimedi.visual_projection.weight, before["visual_projection.weight"])
