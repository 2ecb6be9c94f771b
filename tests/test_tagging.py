"""Token-classification data (research/data/tagging.py): CoNLL-2003 read whole, IOB1 rewritten to IOB2,
malformed lines refused or counted, labels on first word pieces, long sentences cut into windows that lose no
word, and entity scores equal to seqeval's (conlleval's rules) on the real dev tags."""


import numpy as np
import pytest
from helpers import conll
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from research.data.split import DataError, SplitReport
from research.data.tagging import iob1_to_iob2, read_conll, sentence_tags, tokenize
from research.evaluate import entities, entity_scores


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_dir):
    from research.models import load_tokenizer

    return load_tokenizer(minilm_dir)


CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


@pytest.mark.parametrize("name, sentences, tokens, documents", [("train", 14041, 203621, 946),
                                                                ("dev", 3250, 51362, 216),
                                                                ("test", 3453, 46435, 231)])
def test_conll2003_is_read_whole(data_dir, name, sentences, tokens, documents):
    """The data README's counts: every sentence and token, the -DOCSTART- lines dropped and counted."""
    report = SplitReport(name, "conll")
    got = read_conll(data_dir / "conll2003" / f"{name}.txt", 0, 3, report=report)
    assert len(got.words) == sentences and sum(map(len, got.words)) == tokens == report.rows
    assert report.skipped == {"-DOCSTART- line": documents}
    assert name != "train" or (got.words[0][:2] == ["EU", "rejects"] and got.tags[0][:3] == ["B-ORG", "O", "B-MISC"])
    assert {t for tags in got.tags for t in tags} == set(CONLL_TAGS)
    assert all(len(w) == len(t) for w, t in zip(got.words, got.tags, strict=True))


def test_iob1_is_rewritten_to_iob2_and_scores_alike(tmp_path):
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "O", "I-MISC"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "O", "B-MISC"]
    assert iob1_to_iob2(iob1) == iob2
    assert entities(iob1) == entities(iob2) == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 5, 6),
                                                ("MISC", 8, 8)]
    path = tmp_path / "iob1.txt"
    path.write_text("-DOCSTART- O\n\n" + "".join(f"w{i} X {t}\n" for i, t in enumerate(iob1)) + "\n")
    assert read_conll(path, 0, 2, scheme="iob1").tags == [iob2]
    assert read_conll(path, 0, 2).tags == [iob1]  # read as IOB2, the tags are kept as they are


def test_malformed_line_is_an_error_naming_it_or_a_counted_skip(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("EU NNP B-ORG\nrejects VBZ O\n\nPeter B-PER\nBlackburn NNP I-PER\n\nok NN O\n")
    with pytest.raises(DataError, match=r"bad.txt line 4: 2 columns, need 3 .*data.skip_malformed"):
        read_conll(path, 0, 2)
    report = SplitReport("train", str(path))
    got = read_conll(path, 0, 2, skip_malformed=True, report=report)
    assert got.words == [["EU", "rejects"], ["ok"]] and got.lines == [1, 7]
    assert report.skipped_rows == {"malformed line in the sentence (2 columns, need 3 for word column 0 and tag "
                                   "column 2)": [4]}
    path.write_text("EU NNP B-ORG\nrejects VBZ E-ORG\n")
    with pytest.raises(DataError, match="tag 'E-ORG' is not O, B-<type> or I-<type>"):
        read_conll(path, 0, 2)


def test_first_piece_labels_and_windows_lose_no_word(data_dir, minilm_tokenizer):
    """Windows of at most 12 tokens (10 word pieces) over all of CoNLL dev: every word's tag sits on its first
    piece, the windows tile each sentence in order, and reading the gold labels back gives the gold tags."""
    sentences = read_conll(data_dir / "conll2003" / "dev.txt", 0, 3)
    index = {t: i for i, t in enumerate(CONLL_TAGS)}
    report = SplitReport("dev", "conll")
    windows = tokenize(minilm_tokenizer, sentences, index, 12, report)
    assert max(len(x) for x in windows.input_ids) <= 12
    assert report.split_into_windows > 500 and report.used == 3250
    for s in (0, 1, 2):  # windows of a sentence: consecutive, starting at word 0
        starts = windows.first_word[windows.sentence == s]
        assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    lengths = [len(w) for w in sentences.words]
    gold_back = sentence_tags(windows, len(lengths), lengths, [np.maximum(y, 0) for y in windows.token_labels],
                              CONLL_TAGS)
    assert gold_back == sentences.tags
    # Labels: exactly one per word with pieces, at the piece the word's first position names; -1 elsewhere.
    for ids, labels, positions in zip(windows.input_ids, windows.token_labels, windows.word_positions, strict=True):
        assert len(ids) == len(labels)
        assert (labels >= 0).sum() == (positions >= 0).sum() and np.all(labels[positions[positions >= 0]] >= 0)
        assert labels[0] == -1 and labels[-1] == -1  # [CLS] and [SEP]
    with pytest.raises(DataError, match=r"line 3: tag 'B-ORG' is not in the label set \['O'\]"):
        tokenize(minilm_tokenizer, sentences, {"O": 0}, 64, SplitReport("dev", "conll"))


def test_entity_scores_equal_seqeval_on_conll_dev(data_dir):
    """Gold CoNLL dev tags against corrupted copies (tags swapped at random, including I- tags after O, which
    conlleval starts an entity with): micro P/R/F1 and per-type F1 as seqeval computes them (1e-12)."""
    gold = read_conll(data_dir / "conll2003" / "dev.txt", 0, 3).tags
    rng = np.random.default_rng(0)
    for rate in (0.0, 0.05, 0.3):
        pred = [[str(rng.choice(CONLL_TAGS)) if rng.random() < rate else t for t in tags] for tags in gold]
        ours = entity_scores(gold, pred)
        assert ours["entity_precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
        assert ours["entity_recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
        assert ours["entity_f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
        theirs = classification_report(gold, pred, output_dict=True)
        for kind in ("PER", "ORG", "LOC", "MISC"):
            assert ours[f"{kind}/f1"] == pytest.approx(theirs[kind]["f1-score"], abs=1e-12)
            assert ours[f"{kind}/support"] == theirs[kind]["support"]
    assert entity_scores(gold, gold)["entity_f1"] == 1.0


# ------------------------------------------------------------------------------------------ the runner


def test_token_classification_runs_through_the_runner_and_eval(tmp_path, data_dir):
    """Train, then `research eval`: entity scores for dev and test land in metrics.jsonl, the evaluation of
    the saved checkpoint reproduces the in-training one, and the per-token batch ignores what it must."""
    import json

    from research.data.batches import eval_batches
    from research.experiment import prepare
    from research.run import evaluate_run
    from research.train import train

    cfg = conll()
    final = train(cfg, tmp_path / "run")
    assert 0.0 <= final["dev/entity_f1"] <= 1.0 and "test/entity_f1" in final and "dev/PER/f1" in final
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["split_into_windows"] > 0 and report["dev"]["used"] == 64
    again, text = evaluate_run(tmp_path / "run", "latest")
    for key in ("entity_f1", "entity_precision", "accuracy", "loss"):
        assert again[f"eval_latest/{key}"] == pytest.approx(final[f"dev/{key}"], abs=1e-6)
    assert "entities" in text and "PER" in text
    pieces = prepare(cfg, with_train=False)
    batch = next(eval_batches(pieces.dev, 128, cfg.data.buckets, pieces.pad_id))[1]
    assert batch.labels.shape == batch.input_ids.shape == batch.label_weights.shape
    # Weight 1 exactly on first word pieces of real rows: [CLS], [SEP], padding and filler rows weigh 0.
    windows = len(pieces.dev.input_ids)  # more than the 64 sentences: long ones are cut into windows
    assert windows > 64 and batch.label_weights[:, 0].sum() == 0 and batch.label_weights[windows:].sum() == 0
    assert batch.label_weights.sum() == sum(len(w) for w in pieces.dev.sentences.words)


def test_token_classification_config_errors():
    from research.config import ConfigError

    with pytest.raises(ConfigError, match="token_classification.*unset data.text_pair_column"):
        conll('data.text_pair_column="x"')
