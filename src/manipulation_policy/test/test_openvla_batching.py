"""Batched OpenVLA prediction (backends/openvla_batching.py, OpenVLABackend.predict_batch).

The pure pieces are checked against OpenVLA's predict_action rules with small
torch models written here; the backend against the tiny OpenVLA checkpoint,
whose answers batched must equal its answers one at a time.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from manipulation_policy.backends import openvla_batching
from manipulation_policy.backends.openvla import OpenVLABackend, action_model
from manipulation_policy.backends.openvla_batching import (
    action_token_ids,
    decode_actions,
    generation_problem,
    greedy_generate,
    group_by_length,
    stack_rows,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import ActionOverrides, Observation

# --- pure pieces ------------------------------------------------------------------------


def test_rows_group_by_prompt_length_in_order_of_arrival():
    assert group_by_length([12, 12, 15, 12, 9, 15]) == [[0, 1, 3], [2, 5], [4]]
    assert group_by_length([7]) == [[0]]
    assert group_by_length([]) == []


def test_stack_rows_refuses_rows_of_different_lengths():
    row = {"input_ids": torch.ones(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 2, 2)}
    stacked = stack_rows([row, row])
    assert stacked["input_ids"].shape == (2, 4) and stacked["pixel_values"].shape == (2, 3, 2, 2)
    longer = {**row, "input_ids": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="one prompt length"):
        stack_rows([row, longer])


def test_only_plain_greedy_generation_configs_are_batched():
    assert generation_problem(None) is None
    assert generation_problem(GenerationConfig(bos_token_id=1, eos_token_id=2)) is None
    assert "repetition_penalty" in generation_problem(GenerationConfig(repetition_penalty=1.3))
    assert "min_new_tokens" in generation_problem(GenerationConfig(min_new_tokens=3))


def test_action_ids_decode_as_predict_action_does():
    vocab_size, bins = 100, np.linspace(-1, 1, 11)
    centers = (bins[:-1] + bins[1:]) / 2
    stats = {"q01": [-2.0, 0.0], "q99": [2.0, 1.0], "mask": [True, False]}
    # id 99 -> bin 0 (centre -0.9); id 90 -> bin 9 (centre 0.9); id 50 -> clipped to bin 9
    actions = decode_actions([[99, 90], [50, 99]], vocab_size, centers, stats)
    assert actions[0] == pytest.approx([0.5 * (-0.9 + 1) * 4 - 2, 0.9])
    assert actions[1] == pytest.approx([0.5 * (0.9 + 1) * 4 - 2, -0.9])
    # no mask: every dimension un-normalised
    plain = decode_actions([[99, 99]], vocab_size, centers, {"q01": [0, 0], "q99": [1, 1]})
    assert plain[0] == pytest.approx([0.05, 0.05])


def test_after_an_early_eos_the_action_ids_include_the_prompt_tail():
    # generate stopped after 2 of 4 ids: predict_action's [-4:] reaches back into the prompt
    assert action_token_ids([1, 7, 8, 29871], [300, 2], 4) == [8, 29871, 300, 2]
    assert action_token_ids([1, 7], [300, 301, 302], 3) == [300, 301, 302]


class CountingLM(torch.nn.Module):
    """Logits that make the next id (last id + 1) mod vocab, per row; records calls."""

    vocab = 16

    def __init__(self):
        super().__init__()
        self.calls = []

    def logits_for(self, ids):
        nxt = (ids[:, -1] + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float()[:, None, :]

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        self.calls.append(("forward", tuple(input_ids.shape), kwargs.get("use_cache")))
        past = input_ids if kwargs.get("use_cache") else None
        return types.SimpleNamespace(logits=self.logits_for(input_ids), past_key_values=past)


class CachedLM(CountingLM):
    """As CountingLM, with a language_model that decodes one column from a cache."""

    def __init__(self):
        super().__init__()
        outer = self

        class Inner:
            def __call__(self, input_ids, past_key_values, attention_mask, **kwargs):
                assert attention_mask is None and input_ids.shape[1] == 1
                outer.calls.append(("language_model", tuple(input_ids.shape)))
                past = torch.cat([past_key_values, input_ids], dim=1)
                return types.SimpleNamespace(logits=outer.logits_for(past), past_key_values=past)

        self.language_model = Inner()


@pytest.mark.parametrize("model_class", [CountingLM, CachedLM])
def test_greedy_generation_decodes_each_row_and_stops_a_row_at_eos(model_class):
    model = model_class()
    ids = torch.tensor([[1, 3], [1, 9]])  # row 0 runs 4,5,6,7; row 1 runs 10,11(eos)
    out = greedy_generate(model, ids, torch.ones(2, 2), torch.zeros(2, 3, 2, 2), 4,
                          eos_ids=frozenset({11}))  # fmt: skip
    assert out == [[4, 5, 6, 7], [10, 11]]
    if model_class is CachedLM:
        # one batched prefill, then one column per step through the language model
        assert model.calls == [("forward", (2, 2), True)] + [("language_model", (2, 1))] * 3
    else:
        assert [c[1] for c in model.calls] == [(2, 2), (2, 3), (2, 4), (2, 5)]


def test_generation_stops_when_every_row_has_ended():
    model = CountingLM()
    out = greedy_generate(model, torch.tensor([[1, 3], [2, 3]]), None, torch.zeros(2, 1), 7,
                          use_cache=False, eos_ids=frozenset({5}))  # fmt: skip
    assert out == [[4, 5], [4, 5]] and len(model.calls) == 2


# --- the backend with the tiny checkpoint -------------------------------------------------


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def backend(tiny_openvla_dir):
    return OpenVLABackend(model=str(tiny_openvla_dir))


@pytest.fixture
def batch_sizes(backend):
    """Batch sizes of the model's forward calls with an image (prefills, or every step
    without a KV cache), seen by a hook on the real model."""
    sizes: list[int] = []

    def hook(_module, args, kwargs):
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None:
            sizes.append(int(pixel_values.shape[0]))

    handle = action_model(backend._model).register_forward_pre_hook(hook, with_kwargs=True)
    yield sizes
    handle.remove()


def test_describe_says_whether_observations_are_batched(backend):
    info = backend.describe()
    assert info["batched_decoding"] is (backend.batched_decoding_problem is None)
    assert backend.batches_observations is info["batched_decoding"]  # what the server asks


def test_batch_answers_equal_single_answers_in_every_case(backend):
    observations = [
        Observation(image=picture(1), instruction="pick up the red cup"),
        Observation(image=None, instruction="pick up the red cup"),  # a hold
        Observation(image=picture(2), instruction="open the drawer"),
        Observation(image=picture(3).astype(np.float32), instruction="open the drawer"),
        Observation(image=picture(4), instruction="pick up the red cup", eef_pose=None),
    ]
    together = backend.predict_batch(observations)
    assert len(together) == 5
    assert together[1].is_hold
    assert isinstance(together[3], InputError) and together[3].field == "image"
    for index in (0, 2, 4):
        assert together[index] == backend.predict(observations[index])


def test_batched_decoding_is_on_for_a_model_that_decodes_like_openvla(backend):
    assert backend.batched_decoding_problem is None
    assert backend.describe()["batched_decoding"] is True


def test_one_instruction_is_one_batch_equal_to_each_alone(backend, batch_sizes):
    observations = [Observation(image=picture(s), instruction="pick up the red cup")
                    for s in range(10, 16)]  # fmt: skip
    alone = [backend.predict(o) for o in observations]
    assert len({a.eef_target for a in alone}) > 1  # the images really differ
    batch_sizes.clear()
    together = backend.predict_batch(observations)
    assert together == alone
    assert set(batch_sizes) == {6}  # all six in every forward call


def test_different_prompt_lengths_become_sub_batches_each_equal_to_alone(backend, batch_sizes):
    instructions = ["pick up the red cup", "open the drawer", "pick up the red cup",
                    "put the block on the plate", "open the drawer", "pick up the red cup"]
    observations = [Observation(image=picture(20 + i), instruction=text)
                    for i, text in enumerate(instructions)]  # fmt: skip
    alone = [backend.predict(o) for o in observations]
    batch_sizes.clear()
    together = backend.predict_batch(observations)
    assert together == alone
    assert sorted(set(batch_sizes)) == [1, 2, 3]  # three lengths: sub-batches of 3, 2, 1


def test_each_observation_in_a_batch_keeps_its_own_action_overrides(backend, batch_sizes):
    # One image, one instruction: the four answers differ only by each request's overrides.
    image = picture(30)
    overrides = [
        None,
        ActionOverrides(position_scale=0.5, rotation_scale=0.01),
        ActionOverrides(clip_actions=True, position_bounds=(-1e-4, 1e-4)),
        ActionOverrides(clip_actions=True, gripper_bounds=(0.0, 0.0)),
    ]
    observations = [Observation(image=image, instruction="pick up the red cup",
                                action_overrides=o) for o in overrides]  # fmt: skip
    alone = [backend.predict(o) for o in observations]
    batch_sizes.clear()
    together = backend.predict_batch(observations)
    assert set(batch_sizes) == {4}  # decoded together, converted one by one
    assert together == alone
    assert len({repr(a) for a in together}) == 4  # every override changed its own answer
    assert all(0.0 <= a.gripper_command <= 1.0 for a in together)  # 0 = closed, 1 = open
    assert together[3].gripper_command == 0.0  # its own clip, nobody else's
    assert together[0].gripper_command != 0.0


@pytest.mark.parametrize("kv_cache", [True, False])
def test_batched_decoding_follows_the_backends_kv_cache_rule(backend, monkeypatch, kv_cache):
    # transformers 4.50-4.57: no KV cache (the remote code drops the image with one),
    # in the batched decode as in predict_action.
    seen = []
    real = openvla_batching.greedy_generate

    def recording(*args, **kwargs):
        seen.append(kwargs["use_cache"])
        return real(*args, **kwargs)

    monkeypatch.setattr(openvla_batching, "greedy_generate", recording)
    monkeypatch.setattr(backend, "kv_cache", kv_cache)
    monkeypatch.setattr(backend, "_generate_options", {} if kv_cache else {"use_cache": False})
    observations = [Observation(image=picture(s), instruction="open the drawer")
                    for s in range(40, 43)]  # fmt: skip
    assert backend.predict_batch(observations) == [backend.predict(o) for o in observations]
    assert seen == [kv_cache]
