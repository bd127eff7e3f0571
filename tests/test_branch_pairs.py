"""The pure parts of running a guided step's cond and uncond calls as one: learning what the uncond call
replaces, guessing it, checking the guess, stacking the two calls' rows. No processes."""

from __future__ import annotations

import pytest
import torch

from parallel_backend.runtime.calls import ModelCall
from parallel_backend.hosts.branch_pairs import (REMOVED, CannotJoin, guess, join, matches, replacements, same,
                                                 snapshot)


def _flux_like_call(rows: int = 2, text: int = 3, seed: int = 0) -> dict:
    """A cond call's inputs in the shape of Flux's: per-row latents, timestep and text; shared ids; options."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(rows, 4, 8, generator=g), "timestep": torch.full((rows,), 0.5),
            "encoder_hidden_states": torch.randn(rows, text, 8, generator=g), "txt_ids": torch.zeros(text, 3),
            "img_ids": torch.zeros(4, 3), "joint_attention_kwargs": {"scale": 1.0}}


def test_the_learned_replacements_are_the_inputs_whose_values_differ():
    cond = _flux_like_call()
    uncond = dict(cond, timestep=cond["timestep"].clone(), encoder_hidden_states=torch.randn(2, 3, 8),
                  txt_ids=torch.zeros(3, 3), negative_only=1)
    del uncond["joint_attention_kwargs"]
    changes = replacements(snapshot(cond), uncond)
    assert set(changes) == {"encoder_hidden_states", "negative_only", "joint_attention_kwargs"}
    assert changes["encoder_hidden_states"] is uncond["encoder_hidden_states"]
    assert changes["joint_attention_kwargs"] is REMOVED
    next_cond = dict(_flux_like_call(seed=1), timestep=torch.full((2,), 0.25))
    guessed = guess(next_cond, changes)
    assert "joint_attention_kwargs" not in guessed and guessed["negative_only"] == 1
    assert guessed["hidden_states"] is next_cond["hidden_states"] and guessed["timestep"] is next_cond["timestep"]


def test_a_guess_matches_equal_inputs_and_nothing_written_since():
    cond = _flux_like_call()
    guessed = snapshot(cond)
    assert matches(cond, guessed)
    assert matches({k: v.clone() if isinstance(v, torch.Tensor) else dict(v) for k, v in cond.items()}, guessed)
    assert not matches(dict(cond, timestep=torch.full((2,), 0.4)), guessed)
    assert not matches({k: v for k, v in cond.items() if k != "img_ids"}, guessed)
    cond["joint_attention_kwargs"]["scale"] = 2.0  # the pipeline changed its dict in place between the calls
    assert not matches(cond, guessed)
    cond = _flux_like_call()
    guessed = snapshot(cond)
    cond["hidden_states"].add_(1.0)  # the same tensor object, written in place
    assert not matches(cond, guessed)


def test_same_compares_values_of_every_kind():
    assert same(torch.ones(2), torch.ones(2)) and not same(torch.ones(2), torch.ones(3))
    assert not same(torch.ones(2), torch.ones(2, dtype=torch.float64)) and not same(None, torch.ones(1))
    assert same([(1, 4, 4)], [(1, 4, 4)]) and not same([(1, 4, 4)], ((1, 4, 4),)) and same(None, None)


def test_join_stacks_per_row_inputs_as_uncond_then_cond_and_passes_the_rest_once():
    cond = dict(_flux_like_call(), img_shapes=[(1, 2, 2), (1, 2, 2)], prompt_shapes=[(1, 2, 2)])
    uncond = dict(cond, encoder_hidden_states=torch.randn(2, 3, 8), img_shapes=[(1, 3, 3), (1, 3, 3)])
    joined = join(uncond, cond, rows=2, shared=frozenset({"txt_ids", "img_ids"}),
                  row_lists=frozenset({"img_shapes", "prompt_shapes"}))
    for name in ("hidden_states", "timestep", "encoder_hidden_states"):
        assert torch.equal(joined[name], torch.cat([uncond[name], cond[name]])), name
    assert joined["img_shapes"] == uncond["img_shapes"] + cond["img_shapes"]
    assert joined["prompt_shapes"] is cond["prompt_shapes"]  # one per prompt, not per row: passed once
    assert joined["txt_ids"] is cond["txt_ids"] and joined["joint_attention_kwargs"] is cond["joint_attention_kwargs"]


@pytest.mark.parametrize("change, says", [
    ({"encoder_hidden_states": torch.randn(2, 5, 8)}, r"encoder_hidden_states has shape \(2, 5, 8\) in the uncond"),
    ({"txt_ids": torch.ones(3, 3)}, "txt_ids differs between the branches and is not per row"),
    ({"encoder_hidden_states_mask": torch.ones(2, 3)}, "one branch alone passes encoder_hidden_states_mask"),
])
def test_branches_that_cannot_be_stacked_say_which_input_and_why(change, says):
    cond = _flux_like_call()
    with pytest.raises(CannotJoin, match=says):
        join(dict(cond, **change), cond, rows=2, shared=frozenset({"txt_ids", "img_ids"}))


def test_a_row_list_of_another_length_than_the_rows_goes_whole_to_every_share():
    call = ModelCall(torch.zeros(4, 2), torch.zeros(4), extras={"img_shapes": [(1, 2, 2)], "lens": [1, 2, 3, 4]},
                     row_lists=frozenset({"img_shapes", "lens"}))
    share = call.select(range(2, 4))
    assert share.extras == {"img_shapes": [(1, 2, 2)], "lens": [3, 4]}
