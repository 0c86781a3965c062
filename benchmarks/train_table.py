"""Training side by side, in one process: ``lmonnx train`` vs a plain Keras loop.

    python benchmarks/train_table.py [--recipe tied|course] [--corpus synth|ptb|all]
                                     [--seeds 0,1,2] [--work DIR]
                                     [--no-pack] [--sort-pool N (course; implies --no-pack)]

``--recipe tied`` (the default recipe): both train the same ``TiedLanguageModel`` (same
initial weights and dropout seeds: the same seed builds both) on the same stream, with SGD,
global-norm clipping and the plateau decay:

  lmonnx  ``lmonnx.train.trainer.train``: the shuffled sentences as one stream in
          ``batch_size`` columns (``lmonnx.batching.stream_windows``), windows of
          ``max_length`` carrying the state (``StreamStep``), the output layer at real
          positions only;
  plain   :class:`PlainStreamLoop`: the same stream built here with NumPy, logits at every
          position, the masked mean NLL, state carried by hand.

Both take the same steps, so their perplexities differ only by round-off (goal <= 1.01); the
stream has no padding to skip, so the speed ratio is ~1 (no goal).

``--recipe course``: both train the same ``LanguageModel`` (same initial weights: the same
seed builds both), on the same training windows, with the same optimizer (Adam, global-norm
clipping), learning-rate schedule (divided by ``--lr-decay`` after an epoch whose validation
perplexity did not improve; 1 keeps it constant) and number of epochs:

  lmonnx  ``lmonnx.train.trainer.train``, the trainer ``lmonnx train`` runs: the plain loop's
          batches in the plain loop's order (the same shuffle of (seed, epoch)), each packed
          end to end in fewer rows with the LSTM state reset at every window, the output
          layer and loss computed at real (unpadded) positions only; with ``--no-pack``
          padded random batches; with ``--sort-pool N`` > 1 (only here, for comparison: it
          converges markedly slower on PTB, 4-33% higher test perplexity after 3 epochs over
          three seeds for pools of 4) padded batches sorted by length within random pools of
          N batches, each one's summed NLL divided by its pool's mean tokens per batch
          (:func:`sorted_pool_batches`, put in place of the trainer's batches);
  plain   the simplest loop: each epoch one random permutation (seeded by (seed, epoch)) cut
          into consecutive batches of ``batch_size`` windows, each padded to its longest,
          ``model(inputs)`` logits at every position and the masked mean NLL per batch in a
          ``tf.function`` (``GradientTape``, ``apply_gradients``).

With packing both take the same optimisation steps (same batches, same per-token mean loss,
same gradient), so their perplexities differ only by float32 round-off growing over the run;
the speed-up is packing's and the real-position output layer's.  They run in lockstep
(lmonnx's epoch k, then the plain loop's epoch k, through the trainer's ``on_epoch`` hook), so
load from other processes falls on both alike.  Per epoch the table
shows validation perplexity (whole sentences, ``trainer.evaluate_nll`` for both) and training
tokens/s (batching and steps; validation excluded) of each; then the test perplexity of each
one's best validation epoch (for the synthetic corpus beside the true perplexity) and the
ratios the issue asks for: test perplexity lmonnx / plain (goal <= 1.01) and training speed
lmonnx / plain over all epochs (goal >= 1.3).  With several ``--seeds`` it prints each seed
and the means.

Corpora (the issue's settings):

  synth  ``lmonnx.synth`` Markov chain, 100 words, 20000 training sentences (2000 valid, 2000
         test); vocab 104, 2x128, 6 epochs; course: embedding 3, Adam 1e-2, clipnorm 5,
         batch 64; tied: the recipe's defaults (SGD 20, clipnorm 0.25, batch 20, dropout 0.2).
  ptb    trained on ``ptb.valid.txt`` less its last 10% of lines, which are the validation set;
         reported on all of ``ptb.test.txt``; whitespace, vocab 10000, 2x200, 3 epochs;
         course: batch 32, Adam 1e-2, clipnorm 5; tied: the recipe's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PTB = REPO.parent / "shared" / "data"

SYNTH = dict(tokenizer="whitespace", vocab_size=104, num_lstm_units=128, num_lstm_layers=2,
             epochs=6)
PTB_FLAGS = dict(tokenizer="whitespace", vocab_size=10000, num_lstm_units=200,
                 num_lstm_layers=2, epochs=3)
COURSE = {"synth": dict(learning_rate=1e-2, clipnorm=5.0, batch_size=64),
          "ptb": dict(learning_rate=1e-2, clipnorm=5.0, batch_size=32)}
"""The course recipe's settings the table has always used (the tied recipe: its defaults)."""


def _windows(vocab, lines, max_length):
    from lmonnx.batching import split_windows
    from lmonnx.examples import ExampleBuilder

    return [((ex.key, w), x, y) for ex in ExampleBuilder(vocab).build_all(lines)
            for w, (x, y) in enumerate(split_windows(ex.inputs, ex.targets, max_length))]


def sorted_pool_batches(items, config, epoch: int, pool_batches: int) -> list:
    """The trainer's epoch batches (``trainer._epoch_batches``: (batch, loss scale) pairs)
    sorted by length within random pools: the shuffled windows are cut into pools of
    ``pool_batches * batch_size``, each pool sorted by length (ties keep the shuffled order)
    and cut into padded batches of ``batch_size``, and the batches of all pools returned in one
    random order.  Each batch's loss is divided by its pool's mean tokens per batch, so every
    token of a pool weighs the same.  A function of (seed, epoch) only."""
    from lmonnx.batching import pad_batch

    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(items))
    pool_size, out = pool_batches * config.batch_size, []
    for start in range(0, len(order), pool_size):
        pool = sorted((items[i] for i in order[start:start + pool_size]),
                      key=lambda item: len(item[1]))
        batches = [pad_batch([(x, y) for _, x, y in pool[b:b + config.batch_size]])
                   for b in range(0, len(pool), config.batch_size)]
        scale = np.float32(sum(b.tokens for b in batches) / len(batches))
        out += [(b, scale) for b in batches]
    return [out[i] for i in rng.permutation(len(out))]


@contextlib.contextmanager
def sorted_pools(pool_batches: int | None):
    """The trainer trains on :func:`sorted_pool_batches` inside (``pool_batches`` > 1)."""
    from lmonnx.train import trainer

    real = trainer._epoch_batches
    if pool_batches and pool_batches > 1:
        trainer._epoch_batches = lambda items, config, epoch: sorted_pool_batches(
            items, config, epoch, pool_batches)
    try:
        yield
    finally:
        trainer._epoch_batches = real


class PlainLoop:
    """The simplest Keras training loop over the same model, one epoch per call (course)."""

    def __init__(self, config, vocab_size: int, items: list, valid_items: list):
        import keras
        import tensorflow as tf

        from lmonnx.train import LanguageModel

        self.config, self.items, self.valid_items = config, items, valid_items
        keras.utils.set_random_seed(config.seed)  # as the trainer does: the same initial weights
        self.model = LanguageModel(vocab_size, config.max_length, config.num_lstm_units,
                                   config.num_lstm_layers, embedding_dim=config.embedding_dim,
                                   dropout=config.dropout)
        self.model.build()
        clip = {"global_clipnorm": config.clipnorm} if config.clipnorm > 0 else {}
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate, **clip)
        self.lr = config.learning_rate
        self.best_nll, self.best_weights, self.history = math.inf, None, []
        model, optimizer = self.model, self.optimizer
        spec = tf.TensorSpec((None, None), tf.int32)

        @tf.function(input_signature=(spec, spec))
        def step(inputs, targets):
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                mask = tf.cast(tf.math.sign(inputs), tf.float32)
                nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets,
                                                                     logits=logits)
                loss_sum = tf.reduce_sum(nll * mask)
                loss = loss_sum / tf.reduce_sum(mask)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss_sum

        self.step = step

    def train_epoch(self, epoch: int) -> int:
        """One pass over random padded batches; the tokens trained on."""
        from lmonnx.batching import pad_batch

        b = self.config.batch_size
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.items))
        tokens = 0
        for start in range(0, len(order), b):
            batch = pad_batch([self.items[i][1:] for i in order[start:start + b]])
            self.step(batch.inputs, batch.targets)
            tokens += batch.tokens
        return tokens

    def epoch(self, epoch: int) -> dict:
        from lmonnx.train.trainer import evaluate_nll

        t0 = time.perf_counter()
        tokens = self.train_epoch(epoch)
        seconds = time.perf_counter() - t0
        nll, n = evaluate_nll(self.model, self.valid_items)
        record = {"epoch": epoch, "tokens_per_second": tokens / seconds,
                  "train_seconds": seconds, "valid_perplexity": math.exp(nll / n),
                  "learning_rate": self.lr}
        if nll < self.best_nll:
            self.best_nll, self.best_weights = nll, self.model.get_weights()
        elif self.config.lr_decay != 1:  # the same plateau rule as the trainer
            self.lr /= self.config.lr_decay
            self.optimizer.learning_rate.assign(self.lr)
        self.history.append(record)
        return record


class PlainStreamLoop(PlainLoop):
    """The tied recipe written plainly: the stream cut with NumPy, logits everywhere."""

    def __init__(self, config, vocab_size: int, items: list, valid_items: list):
        import keras
        import tensorflow as tf

        from lmonnx.train.tied import TiedLanguageModel

        self.config, self.items, self.valid_items = config, items, valid_items
        keras.utils.set_random_seed(config.seed)  # as the trainer does: the same initial weights
        self.model = model = TiedLanguageModel(vocab_size, config.max_length,
                                               config.num_lstm_units, config.num_lstm_layers,
                                               dropout=config.dropout)
        model.build()
        clip = {"global_clipnorm": config.clipnorm} if config.clipnorm > 0 else {}
        self.optimizer = optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate,
                                                          **clip)
        self.lr = config.learning_rate
        self.best_nll, self.best_weights, self.history = math.inf, None, []

        @tf.function
        def step(inputs, targets, states):
            with tf.GradientTape() as tape:
                outputs, states = model.run_stream(inputs, states, training=True)
                mask = tf.cast(tf.math.sign(inputs), tf.float32)
                nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=targets, logits=model.get_logits(outputs))
                loss = tf.reduce_sum(nll * mask) / tf.reduce_sum(mask)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return states

        self.step = step

    def train_epoch(self, epoch: int) -> int:
        import tensorflow as tf

        c, t = self.config.batch_size, self.config.max_length
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.items))
        stream = [np.concatenate([self.items[i][k] for i in order]) for k in (1, 2)]
        rows = -(-len(stream[0]) // c)
        x, y = (np.pad(s, (0, rows * c - len(s))).astype(np.int32).reshape(c, rows)
                for s in stream)
        states = [[tf.zeros((c, self.config.num_lstm_units))] * 2
                  for _ in range(self.config.num_lstm_layers)]
        for start in range(0, rows, t):
            states = self.step(x[:, start:start + t], y[:, start:start + t], states)
        return len(stream[0])


def run_pair(name: str, config, corpus: Path, valid: Path, test: Path, work: Path,
             true_ppl: float | None, sort_pool: int | None = None) -> dict:
    """Train lmonnx and the plain loop in lockstep; print the per-epoch table."""
    import keras

    from lmonnx.corpus import read_sentences
    from lmonnx.train import trainer
    from lmonnx.vocab import TokenizerOptions, Vocabulary

    lines = list(read_sentences(corpus))
    vocab = Vocabulary.fit((line.text for line in lines), config.vocab_size,
                           TokenizerOptions.from_preset(config.tokenizer))
    tied = config.recipe == "tied"
    items = (trainer.sentence_items(vocab, lines) if tied
             else _windows(vocab, lines, config.max_length))
    valid_items = trainer.sentence_items(vocab, read_sentences(valid))
    test_items = trainer.sentence_items(vocab, read_sentences(test))
    plain = (PlainStreamLoop if tied else PlainLoop)(config, len(vocab), items, valid_items)

    print(f"\n{name}, seed {config.seed}: {len(items)} training "
          f"{'sentences (one stream)' if tied else 'windows'} "
          f"({sum(len(x) for _, x, _ in items)} tokens), vocabulary {len(vocab)}, "
          f"{plain.model.count_params()} parameters")
    header = (f"{'epoch':>5} | {'lmonnx valid ppl':>16} {'tokens/s':>9} {'lr':>8} | "
              f"{'plain valid ppl':>15} {'tokens/s':>9} {'lr':>8} | {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    rows = []

    def both(record):  # lmonnx's epoch is done; run the plain loop's epoch of the same number
        record = record.to_dict()
        p = plain.epoch(record["epoch"])
        rows.append((record, p))
        print(f"{record['epoch']:>5} | {record['valid_perplexity']:>16.3f} "
              f"{record['tokens_per_second']:>9.0f} {record['learning_rate']:>8.2g} | "
              f"{p['valid_perplexity']:>15.3f} {p['tokens_per_second']:>9.0f} "
              f"{p['learning_rate']:>8.2g} | "
              f"{record['tokens_per_second'] / p['tokens_per_second']:>7.2f}x", flush=True)

    run_dir = work / f"{name}-seed{config.seed}"
    with sorted_pools(sort_pool):  # the trainer's own lines go to the (silent) lmonnx logger
        result = trainer.train(config, corpus, valid, run_dir, force=True, on_epoch=both)
    stored = Vocabulary.load(run_dir / "vocab.json")
    assert stored == vocab, "the benchmark's vocabulary differs from the run's"

    lm_model = keras.saving.load_model(run_dir / "model.keras")
    lm_nll, n = trainer.evaluate_nll(lm_model, test_items)
    plain.model.set_weights(plain.best_weights)
    plain_nll, n2 = trainer.evaluate_nll(plain.model, test_items)
    assert n == n2
    lm_ppl, plain_ppl = math.exp(lm_nll / n), math.exp(plain_nll / n)
    lm_seconds = sum(r["train_seconds"] for r, _ in rows)
    plain_seconds = sum(p["train_seconds"] for _, p in rows)
    out = {"name": name, "seed": config.seed, "lmonnx_test_ppl": lm_ppl,
           "plain_test_ppl": plain_ppl, "ppl_ratio": lm_ppl / plain_ppl,
           "speedup": plain_seconds / lm_seconds, "true_ppl": true_ppl,
           "lmonnx_best_epoch": result.best_epoch,
           "plain_best_epoch": 1 + min(range(len(plain.history)),
                                       key=lambda i: plain.history[i]["valid_perplexity"])}
    truth = ""
    if true_ppl:
        truth = (f" (true {true_ppl:.3f}: lmonnx {lm_ppl / true_ppl:.4f}x, "
                 f"plain {plain_ppl / true_ppl:.4f}x)")
    print(f"test perplexity ({n} tokens, best validation epoch: lmonnx {out['lmonnx_best_epoch']}, "
          f"plain {out['plain_best_epoch']}): lmonnx {lm_ppl:.3f}, plain {plain_ppl:.3f}{truth}")
    print(f"ratios: test perplexity lmonnx/plain = {out['ppl_ratio']:.4f} (goal <= 1.01); "
          f"training speed lmonnx/plain = {out['speedup']:.2f}x over {len(rows)} epochs "
          + ("(no padding to skip: ~1x)" if tied else "(goal >= 1.3)"))
    return out


def run_seeds(name: str, configs: list, description: str, corpora: tuple, work: Path,
              true_ppl: float | None, sort_pool: int | None) -> list[dict]:
    """run_pair for each config (one per seed) on (train, valid, test), then the means."""
    results = []
    for config in configs:
        print(f"\n{description}; flags {json.dumps(config.to_dict())}")
        results.append(run_pair(name, config, *corpora, work, true_ppl, sort_pool))
    _summary(name, results)
    return results


def _summary(name: str, results: list[dict]) -> None:
    if len(results) < 2:
        return
    ratio = [r["ppl_ratio"] for r in results]
    speed = [r["speedup"] for r in results]
    print(f"\n{name}, {len(results)} seeds: test perplexity lmonnx/plain mean "
          f"{statistics.mean(ratio):.4f} (per seed {', '.join(f'{x:.4f}' for x in ratio)}); "
          f"speed-up mean {statistics.mean(speed):.2f}x "
          f"(per seed {', '.join(f'{x:.2f}' for x in speed)})")
    if results[0]["true_ppl"]:
        for who in ("lmonnx", "plain"):
            v = [r[f"{who}_test_ppl"] / r["true_ppl"] for r in results]
            print(f"  {who:>6} / true test perplexity: mean {statistics.mean(v):.4f} "
                  f"(per seed {', '.join(f'{x:.4f}' for x in v)})")


def _config(flags: dict, corpus: str, extra: dict, seed: int):
    """The corpus's settings for the recipe in ``extra``, every one resolved."""
    from lmonnx.train.trainer import TrainConfig

    course = COURSE[corpus] if extra["recipe"] == "course" else {}
    return TrainConfig(**{**flags, **course, **extra}, seed=seed).resolved()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=("tied", "course"), default="tied")
    ap.add_argument("--corpus", choices=("synth", "ptb", "all"), default="all")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--epochs", type=int, default=None, help="override the corpus's epochs")
    ap.add_argument("--sort-pool", type=int, default=None,
                    help="lmonnx trains on padded batches sorted by length within random pools "
                         "of N batches (implies --no-pack; default: the trainer's batches)")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="lmonnx pads its random batches instead of packing them")
    ap.add_argument("--lr-decay", type=float, default=None,
                    help="plateau decay for both (default: the trainer's; 1 = constant)")
    ap.add_argument("--ptb", type=Path, default=PTB, help="folder with ptb.valid/test.txt")
    ap.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import tensorflow as tf

    import lmonnx.train.model  # noqa: F401  (quiet TensorFlow start-up, registers the model)
    from lmonnx.synth import write_corpus

    work = args.work or Path(tempfile.mkdtemp(prefix="train_table-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {k: v for k, v in (("lr_decay", args.lr_decay), ("epochs", args.epochs))
             if v is not None}
    extra["recipe"] = args.recipe
    if args.recipe == "course":
        extra["pack"] = args.pack and args.sort_pool in (None, 1)  # sorted pools are padded
    elif not args.pack or args.sort_pool not in (None, 1):
        ap.error("--no-pack and --sort-pool are the course recipe's: add --recipe course")
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs; work folder {work}")
    all_results = []
    if args.corpus in ("synth", "all"):
        d = work / "synth"
        truth = write_corpus(d, seed=0, words=100, train_sentences=20000, force=True)
        true_ppl = truth["true_perplexity"]["test"]
        all_results += run_seeds(
            "synth", [_config(SYNTH, "synth", extra, seed) for seed in seeds],
            "synthetic Markov corpus (100 words, 20000 training sentences)",
            (d / "train.txt", d / "valid.txt", d / "test.txt"), work, true_ppl, args.sort_pool)
    if args.corpus in ("ptb", "all"):
        if not (args.ptb / "ptb.valid.txt").is_file():
            print(f"\nPTB: {args.ptb}/ptb.valid.txt not found; skipped")
        else:
            d = work / "ptb"
            d.mkdir(exist_ok=True)
            lines = (args.ptb / "ptb.valid.txt").read_text(encoding="utf-8").splitlines(True)
            cut = len(lines) - len(lines) // 10
            (d / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
            (d / "valid.txt").write_text("".join(lines[cut:]), encoding="utf-8")
            all_results += run_seeds(
                "ptb", [_config(PTB_FLAGS, "ptb", extra, seed) for seed in seeds],
                f"PTB: train ptb.valid.txt lines 1-{cut}, validate lines {cut + 1}-"
                f"{len(lines)}, test ptb.test.txt",
                (d / "train.txt", d / "valid.txt", args.ptb / "ptb.test.txt"), work, None,
                args.sort_pool)
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
