"""The parts of ``training.evaluate``: ``data`` (benchmark split, saved model, embeddings, slab scores), ``statistics``
(exact random baselines, tail probabilities, AUROC), ``measures`` (zero-shot, retrieval, alignment, embedding spread),
``slice_selection`` (Eq. 1-2 hits on lesion slabs), ``plots`` (t-SNE, selected slabs), ``report`` (verdicts and
markdown) and ``markdown`` (the table helpers the benchmarks share).
"""
