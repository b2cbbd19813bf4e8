"""Pipelines for CT volumes, which transformers has no task for (X-rays use its own "zero-shot-image-classification").

`pipeline("zero-shot-volume-classification", model=folder, trust_remote_code=True)` scores a CT (NIfTI path, DICOM
folder, `CTVolume`) against candidate labels, as the zero-shot image pipeline scores an X-ray;
`pipeline("volume-feature-extraction", ...)` returns a CT's embedding in the common space. Both use the saved
`UniMedIProcessor` (its CT processor and tokenizer); importing `modeling_unimedi` registers them, and a saved UniMedI
model names them in `custom_pipelines` for Hub remote code.
"""

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


class _UniMedIVolumePipeline(Pipeline):
    """One CT per call item, read and resampled by the saved processor's CT processor."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _volume_inputs(self, volume):
        return self.processor(volumes=[volume], return_tensors="pt").to(self.dtype)


class ZeroShotVolumeClassificationPipeline(_UniMedIVolumePipeline):
    """`classifier(ct, candidate_labels=["pleural effusion", "no effusion"], hypothesis_template="{}")` ->
    `[{"score", "label"}]`, most likely first: the softmax over labels of the model's `logits_per_image`."""

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, **kwargs):
        preprocess_params = {}
        if candidate_labels is not None:
            preprocess_params["candidate_labels"] = candidate_labels
        if hypothesis_template is not None:
            preprocess_params["hypothesis_template"] = hypothesis_template
        return preprocess_params, {}, {}

    def preprocess(self, volume, candidate_labels=None, hypothesis_template="{}"):
        if not candidate_labels or isinstance(candidate_labels, str):
            raise ValueError(f"candidate_labels must be a non-empty list of labels, got {candidate_labels!r}")
        inputs = self._volume_inputs(volume)
        texts = self.processor(text=[hypothesis_template.format(label) for label in candidate_labels])
        return {**inputs, **texts, "candidate_labels": list(candidate_labels)}

    def _forward(self, model_inputs):
        candidate_labels = model_inputs.pop("candidate_labels")
        return {"candidate_labels": candidate_labels, "logits": self.model(**model_inputs).logits_per_image}

    def postprocess(self, model_outputs):
        scores = model_outputs["logits"][0].softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, model_outputs["candidate_labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


class VolumeFeatureExtractionPipeline(_UniMedIVolumePipeline):
    """`extractor(ct)` -> the CT's projected [CLS] embedding (`get_volume_features`), a list of `projection_dim`
    floats, or a (1, projection_dim) tensor with `return_tensors=True`; `normalize=True` L2-normalises it."""

    def _sanitize_parameters(self, return_tensors=None, normalize=None, **kwargs):
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
        if normalize is not None:
            postprocess_params["normalize"] = normalize
        return {}, {}, postprocess_params

    def preprocess(self, volume):
        return self._volume_inputs(volume)

    def _forward(self, model_inputs):
        return self.model.get_volume_features(**model_inputs).pooler_output

    def postprocess(self, embeddings, return_tensors=False, normalize=False):
        if normalize:
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return embeddings if return_tensors else embeddings[0].tolist()


for task, pipeline_class in (
    ("zero-shot-volume-classification", ZeroShotVolumeClassificationPipeline),
    ("volume-feature-extraction", VolumeFeatureExtractionPipeline),
):
    if task not in PIPELINE_REGISTRY.get_supported_tasks():  # once, though remote code imports this file again
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModel)

__all__ = ["VolumeFeatureExtractionPipeline", "ZeroShotVolumeClassificationPipeline"]
