"""UniMedI: unified 2D/3D medical vision-language pre-training, Hugging Face native.

Importing this package registers the UniMedI classes with the transformers Auto* factories and marks them for Hub
export, so `save_pretrained` writes an `auto_map` and copies these flat files as remote code.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .modeling_unimedi import UniMedIModel, UniMedIPreTrainedModel, UniMedIVisionModel

AutoConfig.register(UniMedIConfig.model_type, UniMedIConfig, exist_ok=True)
AutoConfig.register(UniMedIVisionConfig.model_type, UniMedIVisionConfig, exist_ok=True)
AutoModel.register(UniMedIConfig, UniMedIModel, exist_ok=True)
AutoModel.register(UniMedIVisionConfig, UniMedIVisionModel, exist_ok=True)

UniMedIConfig.register_for_auto_class()
UniMedIVisionConfig.register_for_auto_class()
UniMedIModel.register_for_auto_class("AutoModel")
UniMedIVisionModel.register_for_auto_class("AutoModel")

__all__ = ["UniMedIConfig", "UniMedIVisionConfig", "UniMedIModel", "UniMedIPreTrainedModel", "UniMedIVisionModel"]
