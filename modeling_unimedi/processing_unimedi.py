"""UniMedIProcessor: X-rays, CT volumes and reports -> exactly the inputs `UniMedIModel` takes for a mixed batch."""

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_unimedi import UniMedIImageProcessor
from .loading_unimedi import checked_bool
from .report_processing_unimedi import prepare_reports
from .volume_processing_unimedi import UniMedIVolumeProcessor

# BERT-family encoders take 512 positions; 256 keeps a full MIMIC-CXR FINDINGS + IMPRESSION (MGCA truncates at 112
# words, about 150 WordPiece tokens) with room for the longer CT reports, at half the text cost of 512.
DEFAULT_MAX_LENGTH = 256


class UniMedIProcessor(ProcessorMixin):
    r"""
    Wraps the X-ray [`UniMedIImageProcessor`], the CT [`UniMedIVolumeProcessor`] and a BERT tokenizer.

    `processor(images=..., volumes=..., text=...)` returns `pixel_values` (X-rays), `volume_values` (CTs) and the
    tokenizer's outputs (`input_ids`, `attention_mask`, and `token_type_ids` for BERT tokenizers), each only for the
    inputs given. Mixed-batch convention (the model relies on it): `text` holds one report per sample, the reports of
    `images` first, in order, then those of `volumes`.

    Args:
        image_processor ([`UniMedIImageProcessor`]): X-ray processor; its settings are saved with the processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the report encoder's tokenizer (BioClinicalBERT's in the paper).
        volume_processor ([`UniMedIVolumeProcessor`] or its `to_dict()`, *optional*): CT processor; defaults to
            `UniMedIVolumeProcessor()`. It is an ordinary saved setting rather than a ProcessorMixin attribute, since
            ProcessorMixin only knows image/video/audio/tokenizer roles; its settings are saved in
            `processor_config.json` under "volume_processor".
        max_length (`int`, defaults to 256): reports are truncated to at most this many tokens, [CLS] and [SEP]
            included, and padded to the longest report of the batch.
        clean_reports (`bool`, defaults to True): run every report through `clean_report` (whitespace,
            de-identification placeholders, stray punctuation) before tokenising.
    """

    def __init__(
        self,
        image_processor: UniMedIImageProcessor,
        tokenizer,
        volume_processor: UniMedIVolumeProcessor | dict | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        clean_reports: bool = True,
    ):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        self.volume_processor = _as_volume_processor(volume_processor)
        self.max_length = max_length
        self.clean_reports = checked_bool("clean_reports", clean_reports)
        super().__init__(image_processor, tokenizer)

    def __call__(
        self,
        images=None,
        text=None,
        volumes=None,
        return_tensors: str | None = "pt",
        training: bool = False,
        clean_reports: bool | None = None,
    ) -> BatchFeature:
        """Process a batch of X-rays, CT volumes and/or reports (any non-empty combination).

        Args:
            images: X-rays, anything `UniMedIImageProcessor` takes (paths, PIL images, arrays; one or a list).
            text: one report (str or UTF-8 bytes) or a list; with images and/or volumes, exactly one per sample,
                the images' reports first, then the volumes'. Empty, whitespace-only or None reports raise ValueError.
            volumes: CTs, anything `UniMedIVolumeProcessor` takes (paths, CTVolume, arrays on the grid).
            return_tensors: "pt" (default) or "np"; None leaves the tokenizer's lists (images/volumes stay tensors).
            training: forwarded to the image and volume processors (random crop / flips); off by default.
            clean_reports: overrides the processor's `clean_reports` setting for this call.
        """
        if images is None and volumes is None and text is None:
            raise ValueError("UniMedIProcessor needs at least one of `images`, `volumes` or `text`")
        clean = self.clean_reports if clean_reports is None else clean_reports
        reports = None if text is None else prepare_reports(text, clean=clean)
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, training=training))
        if volumes is not None:
            data.update(self.volume_processor(volumes, return_tensors=return_tensors, training=training))
        if reports is not None:
            _check_one_report_per_sample(len(reports), data)
            data.update(self.tokenizer(reports, padding="longest", truncation=True, max_length=self.max_length))
        return BatchFeature(data, tensor_type=return_tensors)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Also marks the X-ray processor for Hub export: `from_pretrained` loads it through AutoImageProcessor, which
        finds remote code only through the `auto_map` entry this writes next to its settings."""
        super().register_for_auto_class(auto_class)
        UniMedIImageProcessor.register_for_auto_class("AutoImageProcessor")

    @property
    def model_input_names(self) -> list[str]:
        names = [*self.image_processor.model_input_names, *self.volume_processor.model_input_names]
        return names + [name for name in self.tokenizer.model_input_names if name not in names]


def _as_volume_processor(volume_processor) -> UniMedIVolumeProcessor:
    """The CT processor from an instance, its saved dict (what `from_pretrained` passes) or None (defaults)."""
    if volume_processor is None:
        return UniMedIVolumeProcessor()
    if isinstance(volume_processor, dict):
        return UniMedIVolumeProcessor.from_dict(volume_processor)
    if not isinstance(volume_processor, UniMedIVolumeProcessor):
        raise TypeError(f"volume_processor must be a UniMedIVolumeProcessor, got {type(volume_processor).__name__}")
    return volume_processor


def _check_one_report_per_sample(num_reports: int, vision_inputs: dict) -> None:
    inputs = {"images": "pixel_values", "volumes": "volume_values"}
    counts = {name: len(vision_inputs[key]) for name, key in inputs.items() if key in vision_inputs}
    if counts and num_reports != sum(counts.values()):
        given = " + ".join(f"{count} {name}" for name, count in counts.items())
        raise ValueError(
            f"`text` holds {num_reports} reports but the batch has {given} = {sum(counts.values())} samples: give "
            "one report per sample, the images' reports first, then the volumes'"
        )


__all__ = ["UniMedIProcessor"]
