"""Several observations through OpenVLA at once, each answered as if it were alone.

OpenVLA's remote code (``prismatic/extern/hf/modeling_prismatic.py``) only
generates for one row: ``prepare_inputs_for_generation`` refuses a batch,
the cached decode step asserts batch size 1, and ``predict_action`` appends
token 29871 with a one-row tensor and reads ``generated_ids[0]``. Its
multimodal ``forward`` (the prefill) does take a batch, and its language model
(a Llama) decodes a batch from a KV cache. So a batch is decoded here, step by
step, the way ``predict_action`` -> ``generate`` decodes one row:

- the prompt of each row ends with token 29871, its attention mask with a 1
  (``openvla.append_prompt_end_token``, as for one row);
- rows are batched only with rows of the same prompt length: the image patches
  go in right after position 0 (BOS), so left padding would put them after a
  pad token and change the answer, and right padding breaks generation. Robots
  that share an instruction share a batch; other lengths form other batches;
- prefill: the model's own ``forward`` with the batch's ids, mask and images;
  each next token is the argmax over the whole vocabulary (greedy, as
  ``do_sample=False``); decode steps go to ``model.language_model`` with the
  KV cache and no mask, as the remote ``forward`` does for one row; without a
  KV cache every step re-runs the whole ``forward`` (what ``generate`` does with
  ``use_cache=False``, which the backend passes on transformers 4.50-4.57, where
  a cache makes the remote code drop the image);
- a row that emits EOS stops there (transformers' greedy search does; the
  action is then the last ``action_dim`` ids of prompt + generated, as
  ``generated_ids[0, -action_dim:]`` is for one row);
- action ids -> bins (``vocab_size - id - 1``, clipped) -> bin centres ->
  un-normalised with q01/q99 where the statistics' ``mask`` is true.

Rows never see each other (no padding, per-row attention), so a row's tokens
are the same in any batch, up to the floating-point rounding of batched
matrix products; the backend checks at start-up that batched and single
answers agree on its probe images and turns batching off if they do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

# Generation settings that would add a logits processor to transformers' greedy
# search, with the value at which they add none.
_PLAIN_GREEDY = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "forced_decoder_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
}


def group_by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of rows with equal prompt length, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(int(length), []).append(index)
    return list(groups.values())


def stack_rows(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from one-row inputs of equal length (input_ids, attention_mask, pixel_values)."""
    lengths = {int(row["input_ids"].shape[1]) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows of one batch must have one prompt length, got {sorted(lengths)}")
    names = ("input_ids", "attention_mask", "pixel_values")
    keys = [k for k in names if rows[0].get(k) is not None]
    return {key: torch.cat([row[key] for row in rows], dim=0) for key in keys}


def generation_problem(generation_config: Any) -> Optional[str]:
    """Why transformers' generate would not be plain greedy search with this config,
    or None when it would (then the loop here decodes as it does)."""
    if generation_config is None:
        return None
    for name, plain in _PLAIN_GREEDY.items():
        value = getattr(generation_config, name, plain)
        if value is not None and value != plain and not (plain is None and not value):
            return f"generation_config.{name}={value!r}"
    return None


def eos_token_ids(model: Any) -> frozenset[int]:
    """EOS ids at which the model's ``generate`` stops a row: transformers' generate
    stops there; a model with its own ``generate`` (not transformers') does not."""
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency of this backend
        return frozenset()
    if not isinstance(model, GenerationMixin):
        return frozenset()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits[:, -1, :]


def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    pixel_values: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    eos_ids: frozenset[int] = frozenset(),
) -> list[list[int]]:
    """Greedy decoding of a batch of equal-length rows: per row, its generated ids
    (up to and including an EOS id)."""
    batch = input_ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    cached = use_cache and hasattr(model, "language_model")
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        use_cache=cached,
        return_dict=True,
    )
    ids, mask = input_ids, attention_mask
    for step in range(max_new_tokens):
        next_ids = _logits(output).argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                generated[row].append(token)
                finished[row] = token in eos_ids
        if all(finished) or step == max_new_tokens - 1:
            break
        column = next_ids[:, None].to(ids.dtype)
        past = getattr(output, "past_key_values", None)
        if cached and past is not None:
            # What the remote forward does for one cached row, for the whole batch.
            output = model.language_model(
                input_ids=column,
                attention_mask=None,
                position_ids=None,
                past_key_values=past,
                use_cache=True,
                return_dict=True,
            )
        else:
            ids = torch.cat([ids, column], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            output = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixel_values,
                use_cache=False,
                return_dict=True,
            )
    return generated


def action_token_ids(
    prompt_ids: Sequence[int], generated: Sequence[int], action_dim: int
) -> list[int]:
    """The ids predict_action decodes: the last ``action_dim`` of prompt + generated."""
    return (list(prompt_ids) + list(generated))[-action_dim:]


def decode_actions(
    token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    bin_centers: np.ndarray,
    action_stats: Mapping[str, Any],
) -> np.ndarray:
    """Action ids (one row per observation) -> un-normalised actions, as predict_action."""
    ids = np.asarray(token_ids, dtype=np.int64)
    discretized = np.clip(vocab_size - ids - 1, 0, bin_centers.shape[0] - 1)
    normalized = bin_centers[discretized]
    q01 = np.asarray(action_stats["q01"], dtype=np.float64)
    q99 = np.asarray(action_stats["q99"], dtype=np.float64)
    mask = np.asarray(action_stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)


def predict_raw_batch(
    model: Any,
    rows: Sequence[Mapping[str, torch.Tensor]],
    unnorm_key: Optional[str],
    *,
    use_cache: bool = True,
) -> list[np.ndarray]:
    """Un-normalised actions for prepared one-row inputs (already ending with 29871),
    batched by prompt length; ``model`` is the OpenVLA model itself (the owner of
    ``predict_action``). Call under ``torch.inference_mode()``."""
    action_dim = model.get_action_dim(unnorm_key)
    stats = model.get_action_stats(unnorm_key)
    eos = eos_token_ids(model)
    actions: list[Optional[np.ndarray]] = [None] * len(rows)
    for group in group_by_length([row["input_ids"].shape[1] for row in rows]):
        batch = stack_rows([rows[i] for i in group])
        generated = greedy_generate(
            model,
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["pixel_values"],
            action_dim,
            use_cache=use_cache,
            eos_ids=eos,
        )
        prompts = batch["input_ids"].tolist()
        tokens = [
            action_token_ids(prompt, new, action_dim)
            for prompt, new in zip(prompts, generated, strict=True)
        ]
        decoded = decode_actions(tokens, model.vocab_size, model.bin_centers, stats)
        for index, action in zip(group, decoded, strict=True):
            actions[index] = np.asarray(action, dtype=np.float64)
    return [a for a in actions if a is not None]
