"""The control loop's repeated prompts: state ids swapped into a task's ids, masks and prefill bias shared."""

from __future__ import annotations

import numpy as np

from molmoact2_edge.runtimes.benchmark import synthetic_observation
from molmoact2_edge.runtimes.session import PolicySession, bias_from_allowed
from molmoact2_edge.tokenizers.prompt import prefill_allowed
from molmoact2_edge.types import Observation
from tests._runtime_bundle import tiny_bundle


def test_later_chunks_reuse_the_tasks_masks_and_bias_and_act_the_same() -> None:
    _, _, bundle = tiny_bundle()
    obs = synthetic_observation(PolicySession(bundle, "onnxruntime", graphs=("vision",)))
    moved = Observation(images=obs.images, state=obs.state + 0.3, task=obs.task, timestamp=obs.timestamp)
    warm = PolicySession(bundle, "onnxruntime", intra_op_threads=1)
    first, later = warm.build_prompt(obs), warm.build_prompt(moved)
    assert later.attention_mask is first.attention_mask and not later.attention_mask.flags.writeable
    assert not np.array_equal(later.input_ids, first.input_ids)  # the state differs
    bias = warm._prefill_bias(later)
    assert bias is warm._prefill_bias(first)
    np.testing.assert_array_equal(
        bias[0, 0], bias_from_allowed(prefill_allowed(later.attention_mask, later.token_type_ids))
    )
    warm.act(obs, seed=1)
    fresh = PolicySession(bundle, "onnxruntime", intra_op_threads=1)  # encodes ``moved`` from its text
    np.testing.assert_array_equal(warm.act(moved, seed=2).actions, fresh.act(moved, seed=2).actions)
