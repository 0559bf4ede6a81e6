"""The OpenVLA backend against a tiny OpenVLA-interface checkpoint.

The checkpoint (tiny_openvla.py) is loaded through the same transformers
code path as openvla/openvla-7b: AutoProcessor + the vision-to-sequence
auto class, trust_remote_code=True, safetensors weights.
"""

import importlib.util
import types

import numpy as np
import pytest
import tiny_openvla
import torch
import transformers
from PIL import Image

from manipulation_policy.backends import create_backend, predictor
from manipulation_policy.backends.openvla import (
    FIXED_STACK_PIP,
    PROMPT_END_TOKEN_ID,
    OpenVLABackend,
    alias_auto_map,
    append_prompt_end_token,
    attn_implementation_candidates,
    build_prompt,
    decodes_without_kv_cache,
    image_check_problem,
    image_probes,
    remote_code_failure,
    resolve_auto_model_class,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
    select_unnorm_key,
)
from manipulation_policy.core.errors import BackendStartupError, InputError
from manipulation_policy.core.policy_types import EefTargetMode, Observation, Pose, Vector3
from manipulation_policy.core.pose_math import apply_delta
from manipulation_policy.core.upstream_compat import ActionConversionOptions, convert_action_vector

INSTRUCTION = "pick up the red cup"


def solid(rgb, height=48, width=64):
    image = np.zeros((height, width, 3), np.uint8)
    image[...] = rgb
    return image


RED, BLUE, GREEN = solid((220, 0, 0)), solid((0, 0, 220)), solid((0, 200, 0))


@pytest.fixture(scope="module")
def backend(tiny_openvla_dir):
    return OpenVLABackend(model=str(tiny_openvla_dir))


# --- loading -------------------------------------------------------------------------


def test_loads_through_the_transformers_auto_classes(backend, tiny_openvla_dir):
    info = backend.describe()
    assert info["backend"] == "openvla" == backend.name
    assert info["model"] == str(tiny_openvla_dir)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["quantization"] == "none" and info["lora_adapter"] is None
    assert info["unnorm_key"] == tiny_openvla.DEFAULT_UNNORM_KEY  # the single key, by default
    assert info["attn_implementation"] == "sdpa"  # "auto" on CPU: sdpa first
    assert info["transformers_version"] == transformers.__version__
    assert info["image_sensitivity_checked"] is True
    expected_auto = (
        "AutoModelForVision2Seq"
        if hasattr(transformers, "AutoModelForVision2Seq")
        else "AutoModelForImageTextToText"
    )
    assert info["auto_class"] == expected_auto
    # The model really is the checkpoint's remote code, not a stand-in.
    assert type(backend._model).__name__ == "TinyOpenVLAForActionPrediction"
    assert type(backend._processor).__name__ == "TinyOpenVLAProcessor"


def test_create_backend_treats_empty_strings_and_none_as_unset(tiny_openvla_dir):
    backend = create_backend(
        "openvla",
        model=str(tiny_openvla_dir),
        unnorm_key="",
        quantization="none",
        lora_adapter="",
        max_position_step="",
        check_image_sensitivity=False,
    )
    assert backend.describe()["unnorm_key"] == tiny_openvla.DEFAULT_UNNORM_KEY
    assert backend.describe()["quantization"] == "none"


def test_checkpoint_whose_auto_map_names_the_5x_class_loads_too(tmp_path):
    model_dir = tiny_openvla.build_tiny_openvla(
        tmp_path / "tiny_openvla_itt",
        auto_class_key="AutoModelForImageTextToText",
        dataset_statistics=tiny_openvla.norm_stats_for("tiny_sim"),
    )
    backend = OpenVLABackend(model=str(model_dir))
    assert backend.predict(Observation(image=RED, instruction=INSTRUCTION)).eef_target is not None


def test_auto_class_resolution_prefers_what_transformers_has():
    class Vision2Seq:
        pass

    class ImageTextToText:
        pass

    old = types.SimpleNamespace(AutoModelForVision2Seq=Vision2Seq)
    new = types.SimpleNamespace(AutoModelForImageTextToText=ImageTextToText)
    both = types.SimpleNamespace(
        AutoModelForVision2Seq=Vision2Seq, AutoModelForImageTextToText=ImageTextToText
    )
    assert resolve_auto_model_class(old) == ("AutoModelForVision2Seq", Vision2Seq)
    assert resolve_auto_model_class(new) == ("AutoModelForImageTextToText", ImageTextToText)
    assert resolve_auto_model_class(both)[0] == "AutoModelForVision2Seq"
    with pytest.raises(BackendStartupError, match="4.40.1"):
        resolve_auto_model_class(types.SimpleNamespace(__version__="9.0"))
    name, cls = resolve_auto_model_class()
    assert getattr(transformers, name) is cls


def test_auto_map_alias_fills_in_the_missing_auto_class_name():
    ref = "modeling_prismatic.OpenVLAForActionPrediction"
    for have, want in [
        ("AutoModelForVision2Seq", "AutoModelForImageTextToText"),
        ("AutoModelForImageTextToText", "AutoModelForVision2Seq"),
    ]:
        auto_map = {"AutoConfig": "configuration_prismatic.OpenVLAConfig", have: ref}
        aliased = alias_auto_map(auto_map, want)
        assert aliased[want] == ref and aliased[have] == ref
        assert want not in auto_map  # the input is left alone
    assert alias_auto_map({"AutoModelForVision2Seq": "a.B"}, "AutoModelForVision2Seq") == {
        "AutoModelForVision2Seq": "a.B"
    }
    assert alias_auto_map(None, "AutoModelForVision2Seq") == {}


def test_missing_model_directory_is_a_clear_startup_error(tmp_path):
    with pytest.raises(BackendStartupError, match="does not exist"):
        OpenVLABackend(model=str(tmp_path / "no_such_checkpoint"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendStartupError, match="config.json"):
        OpenVLABackend(model=str(tmp_path / "empty"))
    with pytest.raises(BackendStartupError, match="model"):
        OpenVLABackend(model="")


# --- prediction ----------------------------------------------------------------------


def test_prompt_follows_openvla_format():
    assert (
        build_prompt("  Pick Up The Red Cup ")
        == "In: What action should the robot take to pick up the red cup?\nOut:"
    )


def test_predict_gives_a_delta_action_in_range(backend):
    action = backend.predict(
        Observation(image=RED, instruction=INSTRUCTION, reference_frame="odom")
    )
    assert action.eef_target_mode is EefTargetMode.DELTA
    assert action.reference_frame == "odom"
    assert 0.0 <= action.gripper_command <= 1.0
    assert action.confidence > 0 and not action.is_hold
    p = action.eef_target.position
    assert all(abs(v) <= 0.03 + 1e-9 for v in (p.x, p.y, p.z))  # within q01..q99


def test_raw_action_is_unnormalised_with_the_dataset_statistics(backend):
    raw = backend.predict_raw(Observation(image=BLUE, instruction=INSTRUCTION))
    stats = tiny_openvla.TINY_ACTION_STATS
    assert raw.shape == (7,)
    assert np.all(raw[:6] >= np.array(stats["q01"][:6]) - 1e-9)
    assert np.all(raw[:6] <= np.array(stats["q99"][:6]) + 1e-9)
    assert -1.0 <= raw[6] <= 1.0  # mask false: the bin centre itself


def test_predict_is_the_conversion_of_the_raw_model_output(tiny_openvla_dir):
    backend = OpenVLABackend(
        model=str(tiny_openvla_dir),
        gripper_convention="close_is_one",
        position_scale=2.0,
        rotation_scale=0.5,
        max_position_step=0.02,
        check_image_sensitivity=False,
    )
    current = Pose(Vector3(0.4, 0.0, 0.2))
    observation = Observation(image=GREEN, instruction=INSTRUCTION, eef_pose=current)
    options = ActionConversionOptions("close_is_one", 2.0, 0.5, 0.02, None)
    expected = convert_action_vector(backend.predict_raw(observation), observation, options)
    action = backend.predict(observation)
    assert action == expected.action
    assert action.eef_target_mode is EefTargetMode.DELTA
    (composed,) = predictor(backend)(observation).actions  # a chunk of one
    assert composed.eef_target_mode is EefTargetMode.ABSOLUTE
    assert composed.eef_target == apply_delta(current, action.eef_target)


def test_actions_depend_on_the_image_and_are_deterministic(backend):
    actions = [
        tuple(backend.predict_raw(Observation(image=image, instruction=INSTRUCTION)))
        for image in (RED, BLUE, GREEN)
    ]
    assert len(set(actions)) > 1
    again = backend.predict_raw(Observation(image=RED, instruction=INSTRUCTION))
    assert tuple(again) == actions[0]


def test_missing_image_gives_a_hold_not_a_guess(backend):
    action = backend.predict(Observation(instruction=INSTRUCTION, reference_frame="odom"))
    assert action.is_hold and action.reference_frame == "odom"
    assert "image" in backend.last_hold_reason
    with pytest.raises(InputError) as caught:
        backend.predict_raw(Observation(instruction=INSTRUCTION))
    assert caught.value.field == "image"


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_unusable_image_is_an_input_error_naming_image(backend, image):
    with pytest.raises(InputError) as caught:
        backend.predict(Observation(image=image, instruction=INSTRUCTION))
    assert caught.value.field == "image"


def test_missing_instruction_gives_a_hold(backend):
    assert backend.predict(Observation(image=RED, instruction="   ")).is_hold
    assert "instruction" in backend.last_hold_reason
    with pytest.raises(InputError) as caught:
        backend.predict_raw(Observation(image=RED, instruction="   "))
    assert caught.value.field == "instruction"


# --- un-normalisation key ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_dataset_dir(tiny_openvla_dir, tmp_path_factory):
    stats = {
        **tiny_openvla.norm_stats_for("bridge_orig"),
        **tiny_openvla.norm_stats_for("big_moves", scale=10.0),
    }
    return tiny_openvla.copy_with_statistics(
        tiny_openvla_dir, tmp_path_factory.mktemp("two") / "tiny_openvla_two", stats
    )


def test_ambiguous_unnorm_key_is_refused_listing_keys(two_dataset_dir):
    with pytest.raises(BackendStartupError, match="several datasets") as caught:
        OpenVLABackend(model=str(two_dataset_dir))
    assert "big_moves" in str(caught.value) and "bridge_orig" in str(caught.value)


def test_unknown_unnorm_key_is_refused_listing_valid_keys(two_dataset_dir):
    with pytest.raises(BackendStartupError, match="'fractal'") as caught:
        OpenVLABackend(model=str(two_dataset_dir), unnorm_key="fractal")
    assert "valid keys: big_moves, bridge_orig" in str(caught.value)


def test_chosen_unnorm_key_selects_its_statistics(two_dataset_dir):
    small = OpenVLABackend(model=str(two_dataset_dir), unnorm_key="bridge_orig")
    big = OpenVLABackend(
        model=str(two_dataset_dir), unnorm_key="big_moves", check_image_sensitivity=False
    )
    assert big.describe()["unnorm_key"] == "big_moves"
    observation = Observation(image=RED, instruction=INSTRUCTION)
    raw_small, raw_big = small.predict_raw(observation), big.predict_raw(observation)
    np.testing.assert_allclose(raw_big[:6], 10.0 * raw_small[:6])
    assert raw_big[6] == raw_small[6]  # masked out of un-normalisation


def test_dataset_statistics_file_overrides_config_norm_stats(tiny_openvla_dir, tmp_path):
    # config.json says "tiny_sim"; the fine-tuning run's dataset_statistics.json
    # says "my_robot" with other statistics: the file wins, as in OpenVLA.
    model_dir = tiny_openvla.copy_with_statistics(
        tiny_openvla_dir,
        tmp_path / "tiny_openvla_ft",
        tiny_openvla.norm_stats_for("my_robot", scale=2.0),
    )
    backend = OpenVLABackend(model=str(model_dir), check_image_sensitivity=False)
    assert backend.describe()["unnorm_key"] == "my_robot"
    with pytest.raises(BackendStartupError, match="valid keys: my_robot"):
        OpenVLABackend(model=str(model_dir), unnorm_key="tiny_sim")
    reference = OpenVLABackend(model=str(tiny_openvla_dir), check_image_sensitivity=False)
    observation = Observation(image=BLUE, instruction=INSTRUCTION)
    np.testing.assert_allclose(
        backend.predict_raw(observation)[:6], 2.0 * reference.predict_raw(observation)[:6]
    )


def test_without_dataset_statistics_the_config_norm_stats_are_used(tiny_openvla_dir, tmp_path):
    model_dir = tiny_openvla.copy_with_statistics(
        tiny_openvla_dir, tmp_path / "tiny_openvla_cfg", None
    )
    backend = OpenVLABackend(model=str(model_dir), check_image_sensitivity=False)
    assert backend.describe()["unnorm_key"] == tiny_openvla.DEFAULT_UNNORM_KEY
    with pytest.raises(BackendStartupError, match="config"):
        OpenVLABackend(model=str(model_dir), unnorm_key="bridge_orig")


def test_select_unnorm_key_rules():
    stats = {"a": {}, "b": {}}
    assert select_unnorm_key({"only": {}}, None, "src") == "only"
    assert select_unnorm_key(stats, "b", "src") == "b"
    with pytest.raises(BackendStartupError, match="a, b"):
        select_unnorm_key(stats, None, "src")
    with pytest.raises(BackendStartupError, match="no dataset statistics"):
        select_unnorm_key({}, None, "src")


def test_action_dim_other_than_seven_is_refused(tiny_openvla_dir, tmp_path):
    stats = {"eight": {"action": {"q01": [0.0] * 8, "q99": [1.0] * 8}}}
    model_dir = tiny_openvla.copy_with_statistics(tiny_openvla_dir, tmp_path / "tiny_eight", stats)
    with pytest.raises(BackendStartupError, match="8-dim"):
        OpenVLABackend(model=str(model_dir))


# --- the image-ignored trap (openvla/openvla#346) ------------------------------------


def test_model_that_ignores_its_image_is_refused(tiny_openvla_image_blind_dir):
    with pytest.raises(BackendStartupError) as caught:
        OpenVLABackend(model=str(tiny_openvla_image_blind_dir))
    message = str(caught.value)
    assert "ignores its camera input" in message and "the same action tokens [" in message
    assert transformers.__version__ in message
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 50):
        assert "transformers==4.40.1" in message and "#346" in message


def test_the_blind_variant_really_ignores_images(tiny_openvla_image_blind_dir):
    # Proves the check above is not vacuous: unchecked, the blind model answers
    # one action for every image, while the normal one does not (test above).
    blind = OpenVLABackend(model=str(tiny_openvla_image_blind_dir), check_image_sensitivity=False)
    assert blind.describe()["image_sensitivity_checked"] is False
    answers = {
        tuple(blind.predict_raw(Observation(image=image, instruction=INSTRUCTION)))
        for image in (RED, BLUE, GREEN, *image_probes(64))
    }
    assert len(answers) == 1


def test_image_probes_are_clearly_different():
    probes = image_probes()
    assert all(p.shape == (224, 224, 3) and p.dtype == np.uint8 for p in probes)
    means = [p.reshape(-1, 3).mean(axis=0) for p in probes]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 40


# --- device, dtype, attention, quantization ------------------------------------------


@pytest.mark.parametrize("quantization", ["8bit", "4bit", "8BIT"])
def test_quantization_is_refused_cleanly_without_cuda(tiny_openvla_dir, quantization):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendStartupError, match="needs a CUDA GPU") as caught:
        OpenVLABackend(model=str(tiny_openvla_dir), quantization=quantization)
    assert caught.value.__cause__ is None  # refused before anything was loaded


def test_quantization_rules():
    assert resolve_quantization(None, "cuda", True) is None
    assert resolve_quantization("none", "cpu", False) is None
    assert resolve_quantization("", "cpu", False) is None
    assert resolve_quantization("4bit", "cuda", True) == "4bit"
    assert resolve_quantization("8bit", "cuda:1", True) == "8bit"
    with pytest.raises(BackendStartupError, match="bitsandbytes package"):
        resolve_quantization("8bit", "cuda", False)
    with pytest.raises(BackendStartupError, match="needs a CUDA GPU"):
        resolve_quantization("4bit", "cpu", True)
    with pytest.raises(BackendStartupError, match="'none', '8bit' or '4bit'"):
        resolve_quantization("3bit", "cuda", True)


def test_device_and_dtype_rules():
    assert resolve_device("auto", True) == "cuda" and resolve_device("auto", False) == "cpu"
    assert resolve_device("", False) == "cpu" and resolve_device("cuda:1", True) == "cuda:1"
    with pytest.raises(BackendStartupError, match="CUDA is not available"):
        resolve_device("cuda", False)
    with pytest.raises(BackendStartupError, match="device must be"):
        resolve_device("tpu", True)
    assert resolve_dtype("auto", "cuda", True) is torch.bfloat16
    assert resolve_dtype("auto", "cuda", False) is torch.float16
    assert resolve_dtype("auto", "cpu", True) is torch.float32
    assert resolve_dtype("bf16", "cpu", False) is torch.bfloat16
    with pytest.raises(BackendStartupError, match="dtype must be"):
        resolve_dtype("int4", "cpu", False)


def test_attention_candidates():
    assert attn_implementation_candidates("auto", "cuda") == ["flash_attention_2", "sdpa", "eager"]
    assert attn_implementation_candidates("auto", "cpu") == ["sdpa", "eager"]
    assert attn_implementation_candidates("eager", "cpu") == ["eager"]
    with pytest.raises(BackendStartupError, match="needs CUDA"):
        attn_implementation_candidates("flash_attention_2", "cpu")
    with pytest.raises(BackendStartupError, match="attn_implementation must be"):
        attn_implementation_candidates("xformers", "cpu")


def available_attn_implementations():
    names = ["sdpa", "eager"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.insert(0, "flash_attention_2")
    return names


@pytest.mark.parametrize("attn", available_attn_implementations())
def test_every_attention_implementation_passes_the_image_check_with_the_same_actions(
    backend, tiny_openvla_dir, attn
):
    # The image check runs at start-up: eager attention consumes the mask, so a
    # mask one token short of the ids (what predict_action leaves) fails here.
    chosen = OpenVLABackend(model=str(tiny_openvla_dir), attn_implementation=attn)
    assert chosen.describe()["attn_implementation"] == attn
    for image in (RED, GREEN, *image_probes(64)):
        observation = Observation(image=image, instruction=INSTRUCTION)
        expected = backend.predict_raw(observation)
        np.testing.assert_allclose(chosen.predict_raw(observation), expected)


def test_the_tiny_model_fails_on_a_short_mask_as_openvla_does(backend, tiny_openvla_dir):
    # Proves the test above is not vacuous: the processor's mask as it comes,
    # with the 29871 that predict_action appends to the ids only, breaks eager.
    eager = OpenVLABackend(
        model=str(tiny_openvla_dir), attn_implementation="eager", check_image_sensitivity=False
    )
    inputs = eager._processor(build_prompt(INSTRUCTION), Image.fromarray(RED))
    assert int(inputs["input_ids"][0, -1]) != PROMPT_END_TOKEN_ID
    with pytest.raises(RuntimeError, match="must match the size"):
        eager._model.predict_action(**inputs, do_sample=False)
    # With the token and its mask entry appended first, the same call works.
    action = eager._model.predict_action(**append_prompt_end_token(inputs), do_sample=False)
    np.testing.assert_allclose(
        action, backend.predict_raw(Observation(image=RED, instruction=INSTRUCTION))
    )


def test_prompt_end_token_goes_to_ids_and_mask_once():
    inputs = {"input_ids": torch.tensor([[1, 5, 9]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    out = append_prompt_end_token(inputs)
    assert out["input_ids"].tolist() == [[1, 5, 9, PROMPT_END_TOKEN_ID]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1]]
    again = append_prompt_end_token(out)
    assert again["input_ids"].shape[1] == 4 and again["attention_mask"].shape[1] == 4


@pytest.mark.parametrize("refused", ["sdpa"])
def test_auto_falls_back_when_transformers_refuses_an_implementation(tmp_path, refused):
    # transformers 4.50-4.57 refuse OpenVLA's sdpa with an AttributeError.
    model_dir = tiny_openvla.build_tiny_openvla(
        tmp_path / "refuses",
        dataset_statistics=tiny_openvla.norm_stats_for(tiny_openvla.DEFAULT_UNNORM_KEY),
        refuse_attn=(refused,),
    )
    backend = OpenVLABackend(model=str(model_dir))
    assert backend.describe()["attn_implementation"] == "eager"
    with pytest.raises(BackendStartupError, match="AttributeError: .*_supports_sdpa") as caught:
        OpenVLABackend(model=str(model_dir), attn_implementation=refused)
    assert transformers.__version__ in str(caught.value) and FIXED_STACK_PIP in str(caught.value)


def test_model_that_never_emits_action_tokens_is_reported_as_such(tmp_path):
    model_dir = tiny_openvla.build_tiny_openvla(
        tmp_path / "no_action_head",
        dataset_statistics=tiny_openvla.norm_stats_for(tiny_openvla.DEFAULT_UNNORM_KEY),
        action_head_gain=0.0,
    )
    with pytest.raises(BackendStartupError, match="emitted no action token") as caught:
        OpenVLABackend(model=str(model_dir))
    message = str(caught.value)
    assert "ignores its camera input" not in message
    assert f"ids {tiny_openvla.FIRST_ACTION_TOKEN}..{tiny_openvla.FIRST_ACTION_TOKEN + 255}" in (
        message
    )


def test_image_check_rules():
    a, b = np.zeros(7), np.ones(7)
    token_range = (31744, 32000)
    assert image_check_problem("m", [a, a], [[31800] * 7, [31801] * 7], token_range) is None
    same = image_check_problem("m", [a, b], [[31800] * 7, [31800] * 7], token_range, "4.40.1")
    assert "the same action tokens [31800" in same and "not affected by" in same
    newer = image_check_problem("m", [a, a], [[31800] * 7] * 2, token_range, "4.57.1")
    assert "#346" in newer and "transformers==4.40.1" in newer
    # Tokens unknown: the actions are compared instead.
    assert image_check_problem("m", [a, b], [None, None], token_range) is None
    assert "the same action [" in image_check_problem("m", [a, a], [None, None], token_range)
    # Some action tokens among other ids: a weak model, not a refusal.
    assert image_check_problem("m", [a, b], [[5] * 7, [31999] + [5] * 6], token_range) is None
    assert "emitted no action token" in image_check_problem(
        "m", [a, b], [[5] * 7, [6] * 7], token_range
    )


def test_remote_code_failure_names_version_and_fix_in_one_line():
    error = ImportError("cannot import name 'PaddingStrategy' from 'transformers.tokenization'")
    message = remote_code_failure("openvla/openvla-7b", error, version="5.17.0")
    assert "\n" not in message
    assert "transformers 5.17.0" in message and "PaddingStrategy" in message
    assert message.endswith(FIXED_STACK_PIP)
    older = remote_code_failure("m", ImportError("no timm\nmore"), version="4.40.1")
    assert older == "cannot load OpenVLA model 'm': ImportError: no timm"


def test_kv_cache_is_off_where_it_makes_openvla_drop_the_image(backend):
    assert not decodes_without_kv_cache("4.40.1") and not decodes_without_kv_cache("4.49.0")
    assert decodes_without_kv_cache("4.50.0") and decodes_without_kv_cache("4.57.1")
    assert backend.describe()["kv_cache"] is not decodes_without_kv_cache()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
        ({"dtype": "int4"}, "dtype"),
        ({"gripper_convention": "sideways"}, "gripper_convention"),
        ({"position_scale": -1}, "position_scale"),
        ({"position_scale": 0}, "position_scale"),  # refused everywhere, as per request
        ({"max_rotation_step": -0.1}, "max_rotation_step"),  # 0 is "no cap"
        ({"attn_implementation": "xformers"}, "attn_implementation"),
        ({"device": "mps"}, "device"),
        ({"position_bounds": (1.0, -1.0)}, "position_bounds"),
        ({"clip_actions": "maybe"}, "clip_actions"),
    ],
)
def test_bad_options_are_refused_at_startup(tiny_openvla_dir, options, match):
    with pytest.raises(BackendStartupError, match=match):
        OpenVLABackend(model=str(tiny_openvla_dir), **options)


# --- LoRA ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_adapter_dir(tiny_openvla_dir, tmp_path_factory):
    return tiny_openvla.build_lora_adapter(
        tiny_openvla_dir, tmp_path_factory.mktemp("lora") / "adapter"
    )


def test_lora_adapter_loads_merges_and_changes_the_answers(
    backend, tiny_openvla_dir, lora_adapter_dir
):
    assert (lora_adapter_dir / "adapter_config.json").is_file()
    tuned = OpenVLABackend(model=str(tiny_openvla_dir), lora_adapter=str(lora_adapter_dir))
    info = tuned.describe()
    assert info["lora_adapter"] == str(lora_adapter_dir) and info["lora_merged"] is True
    images = (RED, BLUE, GREEN, *image_probes(64))
    base_answers = [
        backend.predict_raw(Observation(image=i, instruction=INSTRUCTION)) for i in images
    ]
    tuned_answers = [
        tuned.predict_raw(Observation(image=i, instruction=INSTRUCTION)) for i in images
    ]
    assert any(not np.array_equal(a, b) for a, b in zip(base_answers, tuned_answers, strict=True))
    assert tuned.predict(Observation(image=RED, instruction=INSTRUCTION)).eef_target is not None


def test_missing_lora_adapter_directory_is_refused(tiny_openvla_dir, tmp_path):
    with pytest.raises(BackendStartupError, match="lora_adapter directory .* does not exist"):
        OpenVLABackend(model=str(tiny_openvla_dir), lora_adapter=str(tmp_path / "nope"))
    (tmp_path / "not_an_adapter").mkdir()
    with pytest.raises(BackendStartupError, match="adapter_config.json"):
        OpenVLABackend(model=str(tiny_openvla_dir), lora_adapter=str(tmp_path / "not_an_adapter"))
