"""UniMedI: unified 2D/3D medical vision-language pre-training, Hugging Face native.

Importing this package registers the UniMedI classes with the transformers Auto* factories (AutoModel,
AutoModelForZeroShotImageClassification, AutoModelForPreTraining, AutoModelForObjectDetection, AutoProcessor, ...)
and the CT pipelines with PIPELINE_REGISTRY, and marks them for Hub export, so `save_pretrained` writes an `auto_map`
and `custom_pipelines` and copies these flat files as remote code.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .classification_unimedi import UniMedIForImageClassification
from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .detection_unimedi import UniMedIForObjectDetection, UniMedIObjectDetectionOutput
from .image_processing_unimedi import UniMedIImageProcessor
from .loading_unimedi import CTVolume, load_ct, load_xray
from .metrics_unimedi import recall_at_k
from .modeling_unimedi import (
    UniMedIModel,
    UniMedIPreTrainedModel,
    UniMedITextModelWithProjection,
    UniMedIVisionModel,
    UniMedIVisionModelWithProjection,
)
from .pipelines_unimedi import VolumeFeatureExtractionPipeline, ZeroShotVolumeClassificationPipeline
from .pretraining_unimedi import UniMedIForPreTraining, UniMedIForPreTrainingOutput
from .processing_unimedi import UniMedIProcessor
from .segmentation_unimedi import UniMedIForSemanticSegmentation
from .volume_processing_unimedi import UniMedIVolumeProcessor
from .zero_shot_unimedi import RetrievalResult, UniMedIZeroShot

AutoConfig.register(UniMedIConfig.model_type, UniMedIConfig, exist_ok=True)
AutoConfig.register(UniMedIVisionConfig.model_type, UniMedIVisionConfig, exist_ok=True)
AutoModel.register(UniMedIConfig, UniMedIModel, exist_ok=True)
AutoModel.register(UniMedIVisionConfig, UniMedIVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(UniMedIConfig, UniMedIModel, exist_ok=True)
AutoModelForPreTraining.register(UniMedIConfig, UniMedIForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(UniMedIConfig, UniMedIForImageClassification, exist_ok=True)
AutoModelForObjectDetection.register(UniMedIConfig, UniMedIForObjectDetection, exist_ok=True)
AutoModelForSemanticSegmentation.register(UniMedIConfig, UniMedIForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(
    UniMedIConfig, image_processor_classes={"torchvision": UniMedIImageProcessor}, exist_ok=True
)
AutoProcessor.register(UniMedIConfig, UniMedIProcessor, exist_ok=True)

UniMedIConfig.register_for_auto_class()
UniMedIVisionConfig.register_for_auto_class()
UniMedIModel.register_for_auto_class("AutoModel")
UniMedIVisionModel.register_for_auto_class("AutoModel")
UniMedIForPreTraining.register_for_auto_class("AutoModelForPreTraining")
UniMedIForImageClassification.register_for_auto_class("AutoModelForImageClassification")
UniMedIForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
UniMedIForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
UniMedIProcessor.register_for_auto_class()  # also marks UniMedIImageProcessor for AutoImageProcessor

__all__ = [
    "CTVolume",
    "RetrievalResult",
    "UniMedIConfig",
    "UniMedIForPreTraining",
    "UniMedIForPreTrainingOutput",
    "UniMedIForImageClassification",
    "UniMedIForObjectDetection",
    "UniMedIForSemanticSegmentation",
    "UniMedIImageProcessor",
    "UniMedIModel",
    "UniMedIObjectDetectionOutput",
    "UniMedIPreTrainedModel",
    "UniMedIProcessor",
    "UniMedITextModelWithProjection",
    "UniMedIVisionConfig",
    "UniMedIVisionModel",
    "UniMedIVisionModelWithProjection",
    "UniMedIVolumeProcessor",
    "UniMedIZeroShot",
    "VolumeFeatureExtractionPipeline",
    "ZeroShotVolumeClassificationPipeline",
    "load_ct",
    "load_xray",
    "recall_at_k",
]
