"""UniMedIProcessor: X-rays, CT volumes and reports -> exactly the inputs `UniMedIModel` takes for a mixed batch."""

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, Unpack

from .image_processing_unimedi import UniMedIImageProcessor
from .loading_unimedi import checked_bool
from .report_processing_unimedi import prepare_reports
from .volume_processing_unimedi import UniMedIVolumeProcessor

# BERT-family encoders take 512 positions; 256 keeps a full MIMIC-CXR FINDINGS + IMPRESSION (MGCA truncates at 112
# words, about 150 WordPiece tokens) with room for the longer CT reports, at half the text cost of 512.
DEFAULT_MAX_LENGTH = 256
OWN_TEXT_DEFAULTS = ("padding", "truncation", "max_length")


class UniMedIProcessorKwargs(ProcessingKwargs, total=False):
    """Processor-level kwargs on top of transformers' per-modality ones (`text_kwargs`, `images_kwargs`, ...)."""

    training: bool
    clean_reports: bool
    volumes_kwargs: dict
    _defaults = {"text_kwargs": {"padding": "longest", "truncation": True}}


class UniMedIProcessor(ProcessorMixin):
    r"""
    Wraps the X-ray [`UniMedIImageProcessor`], the CT [`UniMedIVolumeProcessor`] and a BERT tokenizer.

    `processor(images=..., volumes=..., text=...)` returns `pixel_values` (X-rays), `volume_values` (CTs) and the
    tokenizer's outputs (`input_ids`, `attention_mask`, and `token_type_ids` for BERT tokenizers), each only for the
    inputs given, any numbers of each, as CLIPProcessor. For training pairs (the model's loss), `text` holds one report
    per sample, the reports of `images` first, in order, then those of `volumes`.

    Args:
        image_processor ([`UniMedIImageProcessor`]): X-ray processor; its settings are saved with the processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the report encoder's tokenizer (BioClinicalBERT's in the paper).
        volume_processor ([`UniMedIVolumeProcessor`] or its `to_dict()`, *optional*): CT processor; defaults to
            `UniMedIVolumeProcessor()`. It is an ordinary saved setting rather than a ProcessorMixin attribute, since
            ProcessorMixin only knows image/video/audio/tokenizer roles; its settings are saved in
            `processor_config.json` under "volume_processor".
        max_length (`int`, defaults to 256): reports are truncated to at most this many tokens, [CLS] and [SEP]
            included, and padded to the longest report of the batch (per-call `max_length`/`padding` override it).
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

    def __call__(self, images=None, text=None, volumes=None, **kwargs: Unpack[UniMedIProcessorKwargs]) -> BatchFeature:
        """Process X-rays, CT volumes and/or texts (any non-empty combination, any numbers of each).

        Args:
            images: X-rays, anything `UniMedIImageProcessor` takes (paths, PIL images, arrays; one or a list).
            text: one text (str or UTF-8 bytes) or a list. For `model(..., return_loss=True)` give one report per
                sample, the images' reports first, then the volumes'; for zero-shot scoring, any prompts. Empty,
                whitespace-only or None texts raise ValueError.
            volumes: CTs, anything `UniMedIVolumeProcessor` takes (paths, CTVolume, arrays on the grid).
            kwargs: transformers' processor kwargs: tokenizer ones (`padding`, `truncation`, `max_length`, ...;
                defaults "longest", True and this processor's `max_length`) and X-ray processor settings (`size`,
                `crop_size`, `do_normalize`, ...) flat or as `text_kwargs=` / `images_kwargs=`; CT processor settings
                as `volumes_kwargs=` (or flat when the X-ray processor has no setting of that name); `return_tensors`
                ("pt" by default, "np", or None for the tokenizer's lists); `training` (random crop / flips, off by
                default) and `clean_reports` (overrides the processor's setting).
        """
        if images is None and volumes is None and text is None:
            raise ValueError("UniMedIProcessor needs at least one of `images`, `volumes` or `text`")
        volumes_kwargs = self._volumes_kwargs(kwargs)
        # the processor's own padding / truncation / max_length defaults win over those the tokenizer was saved with
        tokenizer_defaults = {k: v for k, v in self.tokenizer.init_kwargs.items() if k not in OWN_TEXT_DEFAULTS}
        merged = self._merge_kwargs(UniMedIProcessorKwargs, tokenizer_init_kwargs=tokenizer_defaults, **kwargs)
        return_tensors = merged["text_kwargs"].pop("return_tensors", "pt")
        training = merged.get("training", False)
        data = {}
        if images is not None:
            images_kwargs = {k: v for k, v in merged["images_kwargs"].items() if k != "return_tensors"}
            data.update(
                self.image_processor(images, return_tensors=return_tensors, training=training, **images_kwargs)
            )
        if volumes is not None:
            data.update(
                self.volume_processor(volumes, return_tensors=return_tensors, training=training, **volumes_kwargs)
            )
        if text is not None:
            reports = prepare_reports(text, clean=merged["clean_reports"])
            text_kwargs = {"max_length": self.max_length, **merged["text_kwargs"]}
            data.update(self.tokenizer(reports, **text_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _volumes_kwargs(self, kwargs: dict) -> dict:
        """Pops the CT processor's settings out of `kwargs`: `volumes_kwargs=`, and flat settings that only the CT
        processor has (ProcessorMixin routes the rest; it has no role for a volume processor)."""
        volume_settings = set(self.volume_processor.valid_kwargs.__annotations__)
        image_settings = set(self.image_processor.valid_kwargs.__annotations__) | set(ImagesKwargs.__annotations__)
        flat = {key: kwargs.pop(key) for key in list(kwargs) if key in volume_settings - image_settings}
        return {**flat, **kwargs.pop("volumes_kwargs", {})}

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


__all__ = ["UniMedIProcessor"]
