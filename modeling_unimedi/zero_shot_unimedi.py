"""Zero-shot classification and report <-> X-ray/CT retrieval with a trained [`UniMedIModel`], the way CLIP does it.

Every X-ray, CT volume and text becomes the model's projected [CLS] embedding, L2-normalised. A class is represented
by its prompt ensemble: the mean of its prompts' normalised embeddings, renormalised (CLIP's prompt ensembling).
Class probabilities are the softmax over classes of the cosine similarities times the model's learned logit scale,
the same scaled similarities the model was trained on.

Usage:

    zero_shot = UniMedIZeroShot(model, processor)
    probs, similarity = zero_shot.classify(
        images=["a.jpeg", "b.png"],
        class_prompts={"pleural effusion": ["There is a {} .", "Findings consistent with {}."],
                       "no finding": ["The lungs are clear."]},
    )
    result = zero_shot.rank(reports, volumes=ct_paths)
    recall_at_k(result.similarity, 5)  # report -> CT; the i-th report belongs to the i-th CT
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .metrics_unimedi import recall_at_k

DEFAULT_BATCH_SIZE = 32
# In the prompts of a named class, "{}" stands for the class name: {"pneumonia": ["Findings consistent with {}."]}.
CLASS_NAME_PLACEHOLDER = "{}"


class RetrievalResult(NamedTuple):
    """Rankings in both directions between texts and X-rays/CT volumes.

    similarity: (num_texts, num_candidates) cosine similarities.
    text_to_vision: (num_texts, num_candidates) candidate indices per text, most similar first.
    vision_to_text: (num_candidates, num_texts) text indices per candidate, most similar first.
    """

    similarity: torch.Tensor
    text_to_vision: torch.Tensor
    vision_to_text: torch.Tensor


def check_processor_fits(model, processor, exact_vocabulary: bool = False) -> None:
    """Raise ValueError when the processor's tokenizer can emit ids or lengths the model's text encoder cannot embed.

    With `exact_vocabulary`, the tokenizer and the text encoder must also have the same vocabulary size, the check to
    make when the tokenizer was guessed rather than saved with the model.
    """
    text_config = model.config.text_config
    tokenizer_size = len(processor.tokenizer)
    if tokenizer_size > text_config.vocab_size or (exact_vocabulary and tokenizer_size != text_config.vocab_size):
        raise ValueError(
            f"the tokenizer has {tokenizer_size} tokens but the model's text encoder has a vocabulary of "
            f"{text_config.vocab_size}: they do not belong together; use the tokenizer the model was trained with"
        )
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_positions is not None and processor.max_length > max_positions:
        raise ValueError(
            f"the processor truncates texts to {processor.max_length} tokens but the model's text encoder has only "
            f"{max_positions} positions; build the processor with max_length <= {max_positions}"
        )


def class_prompt_lists(class_prompts) -> list[list[str]]:
    """The prompts of each class, in class order, with "{}" replaced by the class name.

    `class_prompts` is either a mapping class name -> prompt(s), or a sequence with the prompt(s) of each class (no
    names, so no "{}" placeholders). A class's prompt(s) are one string or a non-empty sequence of strings.
    """
    if isinstance(class_prompts, Mapping):
        named = list(class_prompts.items())
    elif isinstance(class_prompts, Sequence) and not isinstance(class_prompts, str):
        named = [(None, prompts) for prompts in class_prompts]
    else:
        raise TypeError(
            f"class_prompts must be a dict class name -> prompts or a list of prompts per class, "
            f"got {type(class_prompts).__name__}"
        )
    if not named:
        raise ValueError("class_prompts holds no classes: give at least one class with its prompts")
    return [_prompts_of_class(name, prompts, index) for index, (name, prompts) in enumerate(named)]


def _prompts_of_class(name, prompts, index: int) -> list[str]:
    label = f"class {index}" if name is None else f"class {name!r}"
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{label}: prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{label} has an empty prompt list: give it at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"{label}: every prompt must be a string, got {type(prompt).__name__}")
        if name is None and CLASS_NAME_PLACEHOLDER in prompt:
            raise ValueError(
                f"{label}: prompt {prompt!r} has a '{{}}' class-name placeholder but the class has no name; "
                "give class_prompts as a dict class name -> prompts"
            )
    return list(prompts) if name is None else [prompt.replace(CLASS_NAME_PLACEHOLDER, str(name)) for prompt in prompts]


class UniMedIZeroShot:
    """Zero-shot classification and retrieval with a `UniMedIModel` and its `UniMedIProcessor`.

    Inputs are encoded in batches of `batch_size` under `torch.inference_mode` on the model's device; returned
    embeddings and scores are float32 on that device. The model is put in eval mode (no dropout). X-rays, volumes and
    texts are lists of anything the processor takes per item (paths, PIL images, arrays, `CTVolume`s, strings); a
    single item is also accepted.
    """

    def __init__(self, model, processor, batch_size: int = DEFAULT_BATCH_SIZE):
        check_processor_fits(model, processor)
        self.model = model.eval()
        self.processor = processor
        self.batch_size = _positive_batch_size(batch_size)

    def encode_images(self, images, batch_size: int | None = None) -> torch.Tensor:
        """(num_images, projection_dim) normalised X-ray embeddings."""
        return self._encode(images, "images", self.model.get_image_features, batch_size)

    def encode_volumes(self, volumes, batch_size: int | None = None) -> torch.Tensor:
        """(num_volumes, projection_dim) normalised CT embeddings."""
        return self._encode(volumes, "volumes", self.model.get_volume_features, batch_size)

    def encode_texts(self, texts, batch_size: int | None = None) -> torch.Tensor:
        """(num_texts, projection_dim) normalised report/prompt embeddings."""
        return self._encode(texts, "text", self.model.get_text_features, batch_size)

    def class_embeddings(self, class_prompts, batch_size: int | None = None) -> torch.Tensor:
        """(num_classes, projection_dim): each class's renormalised mean of its normalised prompt embeddings.

        `class_prompts`: see `class_prompt_lists`; rows follow its class order.
        """
        prompt_lists = class_prompt_lists(class_prompts)
        prompt_embeddings = self.encode_texts([prompt for prompts in prompt_lists for prompt in prompts], batch_size)
        per_class = prompt_embeddings.split([len(prompts) for prompts in prompt_lists])
        return F.normalize(torch.stack([embeddings.mean(dim=0) for embeddings in per_class]), dim=-1)

    @torch.inference_mode()
    def classify(
        self, images=None, volumes=None, *, class_prompts, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot class scores of X-rays or of CT volumes (one of the two).

        Returns `(probs, similarity)`, both (num_samples, num_classes) with columns in the order of `class_prompts`:
        the softmax over classes of the logit-scaled cosine similarities, and the cosine similarities themselves.
        """
        encode_vision, samples = self._vision_encoder(images, volumes)
        classes = self.class_embeddings(class_prompts, batch_size)  # bad prompts fail before any image is read
        similarity = encode_vision(samples, batch_size) @ classes.T
        return (self._logit_scale() * similarity).softmax(dim=-1), similarity

    @torch.inference_mode()
    def rank(self, texts, images=None, volumes=None, batch_size: int | None = None) -> RetrievalResult:
        """Rank X-rays or CT volumes (one of the two) for each text, and the texts for each of them."""
        encode_vision, candidates = self._vision_encoder(images, volumes)
        text_embeddings = self.encode_texts(texts, batch_size)
        similarity = text_embeddings @ encode_vision(candidates, batch_size).T
        return RetrievalResult(
            similarity=similarity,
            text_to_vision=similarity.argsort(dim=1, descending=True, stable=True),
            vision_to_text=similarity.T.argsort(dim=1, descending=True, stable=True),
        )

    def _vision_encoder(self, images, volumes) -> tuple[Callable, object]:
        """The encoder and the inputs of the one modality given, checked before anything is encoded."""
        if (images is None) == (volumes is None):
            raise ValueError("give either `images` (X-rays) or `volumes` (CTs), exactly one of the two")
        return (self.encode_images, images) if images is not None else (self.encode_volumes, volumes)

    @torch.inference_mode()
    def _encode(self, items, processor_argument: str, features: Callable, batch_size: int | None) -> torch.Tensor:
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        if not items:
            raise ValueError(f"no {processor_argument} given: pass a non-empty list")
        step = self.batch_size if batch_size is None else _positive_batch_size(batch_size)
        chunks = []
        for start in range(0, len(items), step):
            inputs = self.processor(**{processor_argument: items[start : start + step]}).to(self.model.device)
            chunks.append(features(**inputs).pooler_output.float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def _logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()


def _positive_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


__all__ = ["RetrievalResult", "UniMedIZeroShot", "check_processor_fits", "class_prompt_lists", "recall_at_k"]
