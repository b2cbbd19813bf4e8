"""training/text_cache.py: the frozen report encoder's memo gives the encoder's answer, encodes each report once, keeps
gradients flowing into the trainable projection, and steps aside whenever the encoder is not a fixed function."""

import pytest
import torch
from tiny_configs import tiny_config

from modeling_unimedi import UniMedIModel
from training.pretrain import freeze_text_layers
from training.text_cache import FrozenTextCache, install_text_cache


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = tiny_config()
    config.text_config.hidden_dropout_prob = 0.1  # dropout exists, so eval mode matters
    model = UniMedIModel(config)
    freeze_text_layers(model.text_model, "all")
    model.text_model.eval()
    return model


def padded_batch():
    """Three reports of different lengths, right-padded; report 0 appears again as row 2."""
    input_ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 22, 23, 3], [2, 10, 11, 12, 3, 0]])
    attention_mask = (input_ids != 0).long()
    return input_ids, attention_mask


def test_cached_outputs_equal_the_encoders_on_real_tokens(model):
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    cache = install_text_cache(model.text_model)
    for _ in range(2):
        with torch.no_grad():
            got = model.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        real = attention_mask.bool()
        torch.testing.assert_close(got.last_hidden_state[real], expected[real], atol=1e-5, rtol=1e-5)
        assert (got.last_hidden_state[~real] == 0).all()
    assert len(cache.entries) == 2  # two distinct reports, each encoded once
    assert (cache.misses, cache.hits) == (2, 4)
    assert install_text_cache(model.text_model) is cache
    model.text_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids))
    assert cache.misses == 2  # zero token types are the default: the same reports
    model.text_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=attention_mask)
    assert cache.misses == 4


def test_gradients_reach_the_projection_through_cached_outputs(model):
    input_ids, attention_mask = padded_batch()

    def projection_gradient():
        model.zero_grad()
        model.get_text_features(input_ids, attention_mask).pooler_output.square().sum().backward()
        return model.text_projection.weight.grad.clone()

    expected = projection_gradient()
    install_text_cache(model.text_model)
    projection_gradient()  # fills the cache
    torch.testing.assert_close(projection_gradient(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["trainable", "dropout_on", "hidden_states"])
def test_cache_steps_aside_when_the_encoder_is_not_a_fixed_function(model, change):
    input_ids, attention_mask = padded_batch()
    cache = install_text_cache(model.text_model)
    kwargs = {}
    if change == "trainable":
        model.text_model.encoder.layer[-1].requires_grad_(True)
    elif change == "dropout_on":
        model.text_model.train()
    else:
        kwargs["output_hidden_states"] = True
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 0, 0)
    if change == "hidden_states":
        assert out.hidden_states is not None


def test_oldest_entries_are_dropped_beyond_the_limit(model):
    input_ids, attention_mask = padded_batch()
    cache = FrozenTextCache(model.text_model, max_entries=1)
    cache(input_ids=input_ids[:2], attention_mask=attention_mask[:2])
    assert len(cache.entries) == 1
    with pytest.raises(ValueError, match="max_entries"):
        FrozenTextCache(model.text_model, max_entries=0)
