"""The evaluation's figures: a t-SNE map of the embeddings (the paper's Fig. 2) and selected vs lesion slabs (Fig. 5)."""

from pathlib import Path

import numpy as np
import torch

from modeling_unimedi import UniMedIProcessor
from modeling_unimedi.slices_unimedi import slab_central_slices, top_k_indices
from processing.groundtruth.reports import FINDING_NAMES, NODULE, NORMAL
from processing.schema import CT, XRAY

from .data import Encoded, Samples
from .slice_selection import lesion_slabs


def finding_group(labels: frozenset[str]) -> str:
    """One colour per sample: its single finding, "normal", or "several findings"."""
    return next(iter(labels)) if len(labels) == 1 else "several findings"


def plot_embedding_map(encoded: dict[str, Encoded], samples: dict[str, Samples], path: Path) -> None:
    """t-SNE of X-ray, CT and report embeddings, coloured by finding and marked by modality (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    groups = {XRAY: ("X-ray", "o"), CT: ("CT", "^"), "report": ("report", "+")}
    points, kinds, colours = [], [], []
    for modality in (XRAY, CT):
        for kind, embeddings in ((modality, encoded[modality].vision), ("report", encoded[modality].reports)):
            points.append(embeddings.numpy())
            kinds += [kind] * len(embeddings)
            colours += [finding_group(labels) for labels in samples[modality].labels]
    points = np.concatenate(points)
    perplexity = max(1.0, min(30.0, (len(points) - 1) / 3))
    mapped = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(points)
    palette = dict(zip([*FINDING_NAMES, NORMAL, "several findings"], plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(figsize=(8, 7))
    for kind, (name, marker) in groups.items():
        for colour, rgb in palette.items():
            chosen = [i for i, (k, c) in enumerate(zip(kinds, colours)) if k == kind and c == colour]
            if chosen:
                axes.scatter(*mapped[chosen].T, marker=marker, color=rgb, s=28, label=f"{name}: {colour}")
    axes.set_title("t-SNE of X-ray, CT and report embeddings (synthetic findings, functional benchmark)")
    axes.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.05))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_slice_selection(
    processor: UniMedIProcessor, patch_depth: int, cts: Samples, scores: torch.Tensor, k: int, path: Path, count=4
) -> list[str]:
    """For a few CTs with a nodule: the central slice of every depth slab, the selected slabs framed in red and the
    ground-truth nodule slabs marked in green (the paper's Fig. 5). Returns the sample ids shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_slabs = scores.shape[1]
    shown = [i for i, item in enumerate(cts.metadata) if NODULE in lesion_slabs(item, num_slabs)][:count]
    if not shown:
        return []
    volumes = processor(volumes=[cts.inputs[i] for i in shown])["volume_values"]
    all_slabs = torch.arange(num_slabs).expand(len(shown), -1)
    slices = slab_central_slices(volumes, all_slabs, patch_depth)[:, :, 0]  # (CTs, slabs, H, W)
    selected = top_k_indices(scores[shown], k).tolist()
    figure, axes = plt.subplots(len(shown), num_slabs, figsize=(1.6 * num_slabs, 1.9 * len(shown)), squeeze=False)
    for row, index in enumerate(shown):
        nodule_slabs = lesion_slabs(cts.metadata[index], num_slabs)[NODULE]
        for slab in range(num_slabs):
            axis = axes[row, slab]
            axis.imshow(slices[row, slab].numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            chosen = slab in selected[row]
            for spine in axis.spines.values():
                spine.set_edgecolor("red" if chosen else "none")
                spine.set_linewidth(3)
            marker = " nodule" if slab in nodule_slabs else ""
            axis.set_title(f"slab {slab}{marker}", fontsize=7, color="green" if marker else "black")
        axes[row, 0].set_ylabel(cts.sample_ids[index].rsplit("-", 1)[-1], fontsize=7)
    figure.suptitle(f"Top-{k} slabs by Eq. 1-2 (red frame) vs ground-truth nodule slabs (green title)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [cts.sample_ids[i] for i in shown]
