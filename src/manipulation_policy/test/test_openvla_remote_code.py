"""The OpenVLA backend against the OpenVLA authors' own remote code.

The remote code (``prismatic/extern/hf`` of github.com/openvla/openvla) is not
part of this repository. The tests take it from ``OPENVLA_HF_DIR``, else from
the project's shared copy beside the checkout (``../shared/openvla-hf``);
without either they skip with one line (``openvla_hf_dir.py``). ``make test``
runs them whenever the shared copy is there, and then they must not skip.

A small checkpoint is built from that code by ``bench/openvla_checkpoint.py
--size tiny`` (random weights, the real classes, processor and Llama-2-shaped
token ids) and served through the backend on every attention path.
The remote code needs transformers 4.x, timm 0.9.x and torchvision (all in
.ci/requirements-dev.txt). Under transformers 5.x they check the start-up refusal.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import openvla_hf_dir
import pytest
import torch
import transformers
from packaging.version import Version

from manipulation_policy.backends.openvla import (
    FIXED_STACK_PIP,
    OpenVLABackend,
    append_prompt_end_token,
    build_prompt,
    decodes_without_kv_cache,
    image_probes,
)
from manipulation_policy.core.errors import BackendStartupError
from manipulation_policy.core.policy_types import Observation

BENCH = Path(__file__).resolve().parents[3] / "bench"
HF_DIR = openvla_hf_dir.hf_dir()
REMOTE_FILES = openvla_hf_dir.REMOTE_FILES
TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5")

_missing = openvla_hf_dir.missing_files()
if _missing and not openvla_hf_dir.required():
    openvla_hf_dir.skip_or_fail(_missing, module_level=True)  # one line for the whole file


@pytest.fixture(scope="module", autouse=True)
def _remote_code_is_there():
    if _missing:  # OPENVLA_HF_DIR asked for these tests: each fails, the rest of the suite runs
        openvla_hf_dir.skip_or_fail(_missing)


@pytest.fixture(scope="module")
def checkpoint_builder():
    sys.path.insert(0, str(BENCH))
    try:
        import openvla_checkpoint

        yield openvla_checkpoint
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("openvla_checkpoint", None)


@pytest.fixture(scope="module")
def real_tiny_dir(checkpoint_builder, tmp_path_factory):
    if TRANSFORMERS_5:
        pytest.skip(
            f"OpenVLA's remote code cannot import under transformers {transformers.__version__}"
        )
    missing = openvla_hf_dir.missing_packages()
    if missing:
        openvla_hf_dir.skip_or_fail(missing)
    return checkpoint_builder.build_checkpoint(
        tmp_path_factory.mktemp("openvla_real") / "tiny",
        HF_DIR,
        size="tiny",
        device="cpu",
        dtype="float32",
        log=lambda _: None,
    )


def _attn_paths():
    """Every attention path this machine offers: flash-attention only with CUDA and flash_attn."""
    names = ["auto", "sdpa", "eager"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    return names


@pytest.fixture(scope="module")
def answers(real_tiny_dir):
    """{attention asked for: (describe(), actions for four images)}; the refusal where refused."""
    images = [*image_probes(64), np.full((48, 64, 3), (0, 200, 0), np.uint8)]
    results = {}
    for attn in _attn_paths():
        try:
            backend = OpenVLABackend(
                model=str(real_tiny_dir), unnorm_key="bridge_orig", attn_implementation=attn
            )
        except BackendStartupError as exc:
            results[attn] = exc
            continue
        actions = [
            backend.predict_raw(Observation(image=image, instruction="pick up the cup"))
            for image in images
        ]
        results[attn] = (backend.describe(), actions)
    return results


def _served_or_skip(answers, attn):
    """(describe(), actions) of a served path; only sdpa on 4.50-4.57 may be refused."""
    result = answers[attn]
    if not isinstance(result, tuple):
        # Every path serves on the pinned line; test_sdpa_is_served_or_refused_... checks why not.
        assert attn == "sdpa" and Version(transformers.__version__) >= Version("4.50"), result
        pytest.skip(f"transformers {transformers.__version__} refuses {attn}")
    return result


@pytest.mark.parametrize("attn", _attn_paths())
def test_every_attention_path_passes_the_image_check_with_the_same_actions(answers, attn):
    served = {name: result for name, result in answers.items() if isinstance(result, tuple)}
    assert "auto" in served and "eager" in served
    reference = served["auto"][1]
    assert len({tuple(a) for a in reference}) > 1  # different images, different actions
    info, actions = _served_or_skip(answers, attn)
    if attn != "auto":
        assert info["attn_implementation"] == attn  # what was asked for, not a fallback
    assert info["image_sensitivity_checked"] is True
    assert info["kv_cache"] is not decodes_without_kv_cache()
    for got, expected in zip(actions, reference, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=attn)


@pytest.mark.parametrize("attn", _attn_paths())
def test_batched_answers_equal_each_observation_alone(answers, real_tiny_dir, attn, capsys):
    # bench/check_batched_openvla.py on the authors' code: the start-up check keeps batched
    # decoding on, and batches of instructions of several token lengths answer, bit for bit,
    # what each observation gets alone.
    _served_or_skip(answers, attn)
    spec = importlib.util.spec_from_file_location(
        "check_batched_openvla", BENCH / "check_batched_openvla.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    code = check.main(
        ["--model", str(real_tiny_dir), "--unnorm-key", "bridge_orig", "--device", "cpu",
         "--dtype", "float32", "--attn-implementation", attn, "--observations", "12",
         "--batch", "4"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "batched decoding on" in out and "12/12 batched actions equal to alone" in out, out


def test_sdpa_is_served_or_refused_the_way_this_transformers_line_does(answers):
    if Version(transformers.__version__) < Version("4.50"):
        assert answers["auto"][0]["attn_implementation"] == "sdpa"
        assert isinstance(answers["sdpa"], tuple)
    else:
        # 4.50-4.57 ask the remote class about sdpa before its LM exists.
        assert answers["auto"][0]["attn_implementation"] == "eager"
        refusal = str(answers["sdpa"])
        assert "AttributeError" in refusal and transformers.__version__ in refusal


def test_unpatched_predict_action_breaks_eager_before_4_50(real_tiny_dir):
    # What the backend works around: predict_action lengthens the ids, not the mask.
    if Version(transformers.__version__) >= Version("4.50"):
        pytest.skip("from 4.50 the first step runs through the KV-cache branch")
    backend = OpenVLABackend(
        model=str(real_tiny_dir),
        unnorm_key="bridge_orig",
        attn_implementation="eager",
        check_image_sensitivity=False,
    )
    from PIL import Image

    image = Image.fromarray(image_probes(64)[0])
    inputs = backend._processor(build_prompt("pick up the cup"), image)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="must match the size"):
        backend._model.predict_action(**inputs, unnorm_key="bridge_orig", do_sample=False)
    with torch.inference_mode():
        backend._model.predict_action(
            **append_prompt_end_token(inputs), unnorm_key="bridge_orig", do_sample=False
        )


def test_under_transformers_5_startup_names_the_fix(tmp_path):
    if not TRANSFORMERS_5:
        pytest.skip("the remote code imports under this transformers")
    # A checkpoint directory as on the Hub, enough for the import to be attempted.
    for name in REMOTE_FILES:
        (tmp_path / name).write_text((HF_DIR / name).read_text())
    (tmp_path / "config.json").write_text(
        '{"model_type": "openvla", "auto_map": {"AutoConfig": '
        '"configuration_prismatic.OpenVLAConfig", "AutoModelForVision2Seq": '
        '"modeling_prismatic.OpenVLAForActionPrediction"}}'
    )
    (tmp_path / "preprocessor_config.json").write_text(
        '{"processor_class": "PrismaticProcessor", "auto_map": {"AutoProcessor": '
        '"processing_prismatic.PrismaticProcessor", "AutoImageProcessor": '
        '"processing_prismatic.PrismaticImageProcessor"}}'
    )
    with pytest.raises(BackendStartupError) as caught:
        OpenVLABackend(model=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"transformers {transformers.__version__}" in message and FIXED_STACK_PIP in message


def test_with_a_kv_cache_newer_lines_drop_the_image(real_tiny_dir):
    # Why the backend decodes without a KV cache from 4.50 (openvla/openvla#346).
    if not decodes_without_kv_cache():
        pytest.skip("before 4.50 the first step sees the image with the cache on")
    from PIL import Image

    backend = OpenVLABackend(
        model=str(real_tiny_dir), unnorm_key="bridge_orig", check_image_sensitivity=False
    )
    cached, uncached = set(), set()
    for probe in image_probes(64):
        inputs = backend._processor(build_prompt("pick up the cup"), Image.fromarray(probe))
        inputs = append_prompt_end_token(inputs)
        with torch.inference_mode():
            for use_cache, seen in ((True, cached), (False, uncached)):
                action = backend._model.predict_action(
                    **inputs, unnorm_key="bridge_orig", do_sample=False, use_cache=use_cache
                )
                seen.add(tuple(np.round(action, 8)))
    assert len(cached) == 1 and len(uncached) > 1
