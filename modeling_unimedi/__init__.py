"""UniMedI: unified 2D/3D medical vision-language pre-training, Hugging Face native.

Importing this package registers the UniMedI classes with the transformers Auto* factories and marks them for Hub
export, so `save_pretrained` writes an `auto_map` and copies these flat files as remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .modeling_unimedi import UniMedIModel, UniMedIPreTrainedModel, UniMedIVisionModel
from .pretraining_unimedi import UniMedIForPreTraining, UniMedIForPreTrainingOutput

AutoConfig.register(UniMedIConfig.model_type, UniMedIConfig, exist_ok=True)
AutoConfig.register(UniMedIVisionConfig.model_type, UniMedIVisionConfig, exist_ok=True)
AutoModel.register(UniMedIConfig, UniMedIModel, exist_ok=True)
AutoModel.register(UniMedIVisionConfig, UniMedIVisionModel, exist_ok=True)
AutoModelForPreTraining.register(UniMedIConfig, UniMedIForPreTraining, exist_ok=True)

UniMedIConfig.register_for_auto_class()
UniMedIVisionConfig.register_for_auto_class()
UniMedIModel.register_for_auto_class("AutoModel")
UniMedIVisionModel.register_for_auto_class("AutoModel")
UniMedIForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "UniMedIConfig",
    "UniMedIVisionConfig",
    "UniMedIModel",
    "UniMedIPreTrainedModel",
    "UniMedIVisionModel",
    "UniMedIForPreTraining",
    "UniMedIForPreTrainingOutput",
]
