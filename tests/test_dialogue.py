"""Dialogue response data (research/data/dialogue.py) on the real CamRest676: the 3:1:1 split in file order
keeps every turn, only response tokens (and the closing end-of-text) are targets, and a small token budget
drops earlier turns whole, cuts the user's utterance from its start, and never cuts a response."""

import json

import numpy as np
import pytest

from research.config import ConfigError, DataConfig
from research.data.dialogue import load_split, split_of
from research.data.split import DataError

CAMREST = "dialog/camrest676/CamRest676.json"
EOS = 50256


@pytest.fixture(scope="module")
def gpt2_tokenizer(data_dir):
    from research.models import load_tokenizer

    return load_tokenizer(data_dir / "tokenizers" / "gpt2")


def test_split_three_one_one_in_file_order_keeps_every_turn(data_dir, gpt2_tokenizer):
    dialogues = json.loads((data_dir / CAMREST).read_text())
    parts = [split_of(dialogues, s) for s in ("train", "dev", "test")]
    assert [len(p) for p in parts] == [406, 135, 135] and sum(parts, []) == dialogues
    cfg = DataConfig(train=CAMREST, dev=CAMREST, test={"test": CAMREST}, max_length=256, buckets=(256,))
    splits = {s: load_split(cfg, s, gpt2_tokenizer, EOS) for s in ("train", "dev", "test")}
    assert sum(len(s) for s in splits.values()) == 2744  # the published turn count


def test_only_the_response_is_a_target(data_dir, gpt2_tokenizer):
    cfg = DataConfig(train=CAMREST, dev=CAMREST, max_length=256, buckets=(256,))
    dev = load_split(cfg, "dev", gpt2_tokenizer, EOS)
    for i in (0, 1, 2, 100):
        ids, target = dev.input_ids[i], dev.token_targets[i]
        first = int(np.flatnonzero(target >= 0)[0])  # the position of the last context token ("System:")
        assert gpt2_tokenizer.decode(ids[: first + 1].tolist()) == dev.texts[i] and dev.texts[i].endswith("System:")
        assert np.array_equal(target[first:-1], ids[first + 1 :]) and target[-1] == -1 and ids[-1] == EOS
        assert np.all(target[:first] == -1)
        assert gpt2_tokenizer.decode(ids[first + 1 : -1].tolist()) == " " + dev.responses[i]
    assert dev.texts[1].startswith(dev.texts[0])  # the second turn's context holds the first turn


def test_a_small_budget_drops_turns_whole_and_never_cuts_a_response(data_dir, gpt2_tokenizer):
    cfg = DataConfig(train=CAMREST, dev=CAMREST, max_length=64, buckets=(64,))
    dev = load_split(cfg, "dev", gpt2_tokenizer, EOS)
    assert max(len(x) for x in dev.input_ids) <= 64
    assert dev.report.context_turns_left_out > 0 and not dev.report.skipped  # context, not examples, left out
    assert "earlier turns out of contexts" in dev.report.summary()
    assert dev.report.truncated_examples > 0  # utterances cut from their start
    for ids, target, response, context in zip(dev.input_ids, dev.token_targets, dev.responses, dev.texts,
                                              strict=True):
        first = int(np.flatnonzero(target >= 0)[0])
        assert gpt2_tokenizer.decode(ids[first + 1 : -1].tolist()) == " " + response  # whole
        assert context.endswith("System:") and (context.startswith("User:") or context.count("User:") <= 1)
    with pytest.raises(DataError, match=r"a response of \d+ tokens does not fit data.max_length=8"):
        load_split(DataConfig(train=CAMREST, dev=CAMREST, max_length=8, buckets=(8,)), "dev", gpt2_tokenizer, EOS)
    with pytest.raises(DataError, match="CamRest676 has the splits"):
        load_split(DataConfig(train=CAMREST, dev=CAMREST, test={"heldout": CAMREST}), "heldout", gpt2_tokenizer,
                   EOS)


def test_dialogue_samples_need_a_dialogue_lm():
    from research.config import ExperimentConfig, ModelConfig, TrainConfig

    with pytest.raises(ConfigError, match="sample_dev_examples answers dev dialogue contexts"):
        ExperimentConfig(name="x", model=ModelConfig(task="causal_lm"), train=TrainConfig(sample_dev_examples=2))
