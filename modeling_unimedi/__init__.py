"""UniMedI: unified 2D/3D medical vision-language pre-training, Hugging Face native.

Importing this package registers the UniMedI classes with the transformers Auto* factories and marks them for Hub
export, so `save_pretrained` writes an `auto_map` and copies these flat files as remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining, AutoProcessor

from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .image_processing_unimedi import UniMedIImageProcessor
from .loading_unimedi import CTVolume, load_ct, load_xray
from .modeling_unimedi import UniMedIModel, UniMedIPreTrainedModel, UniMedIVisionModel
from .pretraining_unimedi import UniMedIForPreTraining, UniMedIForPreTrainingOutput
from .processing_unimedi import UniMedIProcessor
from .volume_processing_unimedi import UniMedIVolumeProcessor
from .zero_shot_unimedi import RetrievalResult, UniMedIZeroShot, recall_at_k

AutoConfig.register(UniMedIConfig.model_type, UniMedIConfig, exist_ok=True)
AutoConfig.register(UniMedIVisionConfig.model_type, UniMedIVisionConfig, exist_ok=True)
AutoModel.register(UniMedIConfig, UniMedIModel, exist_ok=True)
AutoModel.register(UniMedIVisionConfig, UniMedIVisionModel, exist_ok=True)
AutoModelForPreTraining.register(UniMedIConfig, UniMedIForPreTraining, exist_ok=True)
AutoImageProcessor.register(
    UniMedIConfig, image_processor_classes={"torchvision": UniMedIImageProcessor}, exist_ok=True
)
AutoProcessor.register(UniMedIConfig, UniMedIProcessor, exist_ok=True)

UniMedIConfig.register_for_auto_class()
UniMedIVisionConfig.register_for_auto_class()
UniMedIModel.register_for_auto_class("AutoModel")
UniMedIVisionModel.register_for_auto_class("AutoModel")
UniMedIForPreTraining.register_for_auto_class("AutoModelForPreTraining")
UniMedIProcessor.register_for_auto_class()  # also marks UniMedIImageProcessor for AutoImageProcessor

__all__ = [
    "UniMedIConfig",
    "UniMedIVisionConfig",
    "UniMedIModel",
    "UniMedIPreTrainedModel",
    "UniMedIVisionModel",
    "UniMedIForPreTraining",
    "UniMedIForPreTrainingOutput",
    "UniMedIImageProcessor",
    "UniMedIVolumeProcessor",
    "UniMedIProcessor",
    "CTVolume",
    "load_ct",
    "load_xray",
    "UniMedIZeroShot",
    "RetrievalResult",
    "recall_at_k",
]
