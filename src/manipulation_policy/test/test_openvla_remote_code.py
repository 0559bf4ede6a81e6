"""The OpenVLA backend against the OpenVLA authors' own remote code.

The remote code (``prismatic/extern/hf`` of github.com/openvla/openvla) is not
part of this repository; point ``OPENVLA_HF_DIR`` at a fetched copy to run
these tests, e.g.::

    git clone https://github.com/openvla/openvla /tmp/openvla
    OPENVLA_HF_DIR=/tmp/openvla/prismatic/extern/hf pytest test_openvla_remote_code.py

A small checkpoint is built from that code by ``bench/openvla_checkpoint.py
--size tiny`` (random weights, the real classes, processor and Llama-2-shaped
token ids) and served through the backend on every attention path.
The remote code needs transformers 4.x, timm 0.9.x and torchvision; the tests
skip without them. Under transformers 5.x they check the start-up refusal.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
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
HF_DIR = os.environ.get("OPENVLA_HF_DIR", "")
REMOTE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5")

pytestmark = pytest.mark.skipif(
    not HF_DIR or not all((Path(HF_DIR) / name).is_file() for name in REMOTE_FILES),
    reason="set OPENVLA_HF_DIR to OpenVLA's prismatic/extern/hf to run these tests",
)


def _needs(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"OpenVLA's remote code needs {', '.join(missing)}")


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
    _needs("timm", "torchvision")
    return checkpoint_builder.build_checkpoint(
        tmp_path_factory.mktemp("openvla_real") / "tiny",
        Path(HF_DIR),
        size="tiny",
        device="cpu",
        dtype="float32",
        log=lambda _: None,
    )


def _attn_paths():
    names = ["auto", "sdpa", "eager"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    return names


@pytest.fixture(scope="module")
def answers(real_tiny_dir):
    """{attention asked for: (describe(), actions for four images)}; None where refused."""
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


def test_every_attention_path_passes_the_image_check_with_the_same_actions(answers):
    served = {attn: result for attn, result in answers.items() if isinstance(result, tuple)}
    assert "auto" in served and "eager" in served
    reference = served["auto"][1]
    assert len({tuple(a) for a in reference}) > 1  # different images, different actions
    for attn, (info, actions) in served.items():
        assert info["image_sensitivity_checked"] is True
        assert info["kv_cache"] is not decodes_without_kv_cache()
        for got, expected in zip(actions, reference, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=attn)


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
        (tmp_path / name).write_text((Path(HF_DIR) / name).read_text())
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
