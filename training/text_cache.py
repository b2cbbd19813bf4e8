"""A memo of a frozen report encoder's outputs: each distinct report is encoded once per run, not at every step.

With ``freeze_text_layers: all`` the report encoder is a fixed function of the token ids (no gradients, dropout off),
yet every step ran it again on every report of the batch. ``install_text_cache(model.unimedi.text_model)`` replaces
the encoder's ``forward`` with a ``FrozenTextCache`` that encodes only the reports it has not seen and serves the
others from memory. It steps aside (calls the encoder itself) whenever the result could differ from the cached one:
a parameter requires gradients, a dropout layer is in training mode, or hidden states / attentions are requested.

Padding positions come back as zeros: with an attention mask, the encoder's outputs there are computed but mean
nothing, and the cached real-token outputs are those of the report alone (equal to the batched ones to float
rounding).
"""

from collections import OrderedDict

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

DEFAULT_MAX_ENTRIES = 16384  # ~60 real tokens x 384 floats x 4 bytes per MiniLM report: ~1.5 GB at the limit


class FrozenTextCache:
    """``forward`` of a frozen BERT-family encoder with a least-recently-used memo keyed by each report's real
    tokens (ids and token types where the attention mask is 1)."""

    def __init__(self, text_model: torch.nn.Module, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.text_model = text_model
        self.encode = text_model.forward  # the bound original
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def usable(self, kwargs: dict) -> bool:
        """True when the encoder's output is a fixed function of the tokens, so a memo returns the same answer."""
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or kwargs.get("return_dict") is False:
            return False
        if any(parameter.requires_grad for parameter in self.text_model.parameters()):
            return False
        return not any(module.training for module in self.text_model.modules() if isinstance(module, torch.nn.Dropout))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        known = {"return_dict", "output_hidden_states", "output_attentions"}
        if input_ids is None or set(kwargs) - known or not self.usable(kwargs):
            return self.encode(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs
            )
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        keys = [self._key(input_ids[row], token_type_ids, row, mask[row]) for row in range(len(input_ids))]
        first_rows = {key: row for row, key in reversed(list(enumerate(keys)))}  # a report repeated in the batch
        missing = sorted(row for key, row in first_rows.items() if key not in self.entries)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._encode_rows(missing, keys, input_ids, attention_mask, token_type_ids, mask)
        first = self.entries[keys[0]]["last_hidden_state"]
        hidden = first.new_zeros((*input_ids.shape, first.shape[-1]))
        for row, key in enumerate(keys):
            self.entries.move_to_end(key)
            hidden[row, mask[row]] = self.entries[key]["last_hidden_state"]
        pooled = [self.entries[key].get("pooler_output") for key in keys]
        pooler_output = torch.stack(pooled) if pooled[0] is not None else None
        while len(self.entries) > self.max_entries:  # after assembling: this batch's reports are all served
            self.entries.popitem(last=False)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooler_output)

    @staticmethod
    def _key(ids: torch.Tensor, token_type_ids: torch.Tensor | None, row: int, mask: torch.Tensor) -> bytes:
        key = ids[mask].cpu().numpy().tobytes()
        if token_type_ids is not None and bool(token_type_ids[row].any()):  # all zeros: the encoder's default
            key += b"|" + token_type_ids[row][mask].cpu().numpy().tobytes()
        return key

    @torch.no_grad()
    def _encode_rows(self, rows, keys, input_ids, attention_mask, token_type_ids, mask) -> None:
        def pick(tensor):
            return None if tensor is None else tensor[rows]

        out = self.encode(
            input_ids=pick(input_ids),
            attention_mask=pick(attention_mask),
            token_type_ids=pick(token_type_ids),
            return_dict=True,
        )
        for position, row in enumerate(rows):
            entry = {"last_hidden_state": out.last_hidden_state[position, mask[row]].clone()}
            if getattr(out, "pooler_output", None) is not None:
                entry["pooler_output"] = out.pooler_output[position].clone()
            self.entries[keys[row]] = entry


def install_text_cache(text_model: torch.nn.Module, max_entries: int = DEFAULT_MAX_ENTRIES) -> FrozenTextCache:
    """Route ``text_model``'s forward through a ``FrozenTextCache`` (once: a second call returns the installed one).
    Call it after freezing, e.g. in ``training.pretrain.train`` right after ``freeze_text_layers``."""
    installed = text_model.__dict__.get("forward")
    if isinstance(installed, FrozenTextCache):
        return installed
    cache = FrozenTextCache(text_model, max_entries)
    text_model.forward = cache
    return cache
