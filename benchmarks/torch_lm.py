"""The PyTorch peer of benchmarks/quality_table.py: pytorch/examples' word_language_model recipe.

    python benchmarks/torch_lm.py --data DIR --corpus ptb [--epochs 40] [--minutes 30]

Its model and recipe, as that example trains them (written here from its description, not
copied): an embedding, a 2-layer LSTM, a linear decoder tied to the embedding (``--tied``;
200 wide), dropout 0.2 on the embeddings, between the layers and before the decoder; plain
SGD at learning rate 20, gradients clipped to norm 0.25, the rate divided by 4 after an epoch
whose validation loss did not improve; the training text as one stream of words with
``<eos>`` after each sentence, cut into 20 columns and windows of 35 steps, the state carried
from window to window (truncated backpropagation through time).

Scored under quality_table's convention: the same splits (``quality_splits.py``) and closed
vocabulary (a test word outside the training words is ``<unk>``), each test sentence from a
zero state, input ``<eos> w1 .. wn`` and targets ``w1 .. wn <eos>`` (``<eos>`` is the
stream's sentence boundary, so it plays ``<s>`` and ``</s>``), n+1 tokens, perplexity =
exp(NLL / tokens).  Prints one row: test perplexity, epochs, training seconds, scoring
words/s.  Torch threads: all cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from machine import cpu_model
from quality_splits import print_table, splits

EOS, UNK = "<eos>", "<unk>"


class WordLM(nn.Module):
    """Embedding -> 2-layer LSTM -> linear decoder sharing the embedding matrix."""

    def __init__(self, vocab: int, width: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, layers, dropout=dropout, batch_first=True)
        self.decode = nn.Linear(width, vocab)
        self.decode.weight = self.embed.weight  # tied: one matrix
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decode.bias)

    def forward(self, ids, state=None):
        out, state = self.lstm(self.drop(self.embed(ids)), state)
        return self.decode(self.drop(out)), state


def vocabulary(train: list[str]) -> dict[str, int]:
    words = sorted({w for s in train for w in s.split()} | {EOS, UNK})
    return {w: i for i, w in enumerate(words)}


def stream(sentences: list[str], vocab: dict[str, int], columns: int) -> torch.Tensor:
    """int64 [columns, steps]: the text as one stream, ``<eos>`` after each sentence."""
    ids = [vocab.get(w, vocab[UNK]) for s in sentences for w in (*s.split(), EOS)]
    steps = len(ids) // columns
    return torch.tensor(ids[:steps * columns]).view(columns, steps)


def train_epoch(model, data, lr: float, bptt: int = 35, clip: float = 0.25) -> None:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    state = None
    for start in range(0, data.size(1) - 1, bptt):
        n = min(bptt, data.size(1) - 1 - start)
        x, y = data[:, start:start + n], data[:, start + 1:start + 1 + n]
        state = None if state is None else tuple(s.detach() for s in state)
        model.zero_grad()
        logits, state = model(x, state)
        loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)


@torch.no_grad()
def sentence_nll(model, sentences: list[str], vocab: dict[str, int], batch: int = 64):
    """(total NLL in nats, tokens): each sentence from a zero state, ``<eos>`` scored."""
    model.eval()
    encoded = sorted(([vocab[EOS]] + [vocab.get(w, vocab[UNK]) for w in s.split()]
                      + [vocab[EOS]] for s in sentences), key=len)
    total, tokens = 0.0, 0
    for i in range(0, len(encoded), batch):
        rows = encoded[i:i + batch]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
        logits, _ = model(ids[:, :-1])  # right padding: real positions never see it
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        mask = torch.zeros_like(nll)
        for r, row in enumerate(rows):
            mask[r, :len(row) - 1] = 1
        total += float((nll * mask).sum(dtype=torch.float64))
        tokens += int(mask.sum())
    return total, tokens


def torch_row(split: dict, *, epochs: int = 40, minutes: float = 30.0, seed: int = 1111,
              log=print) -> dict:
    """Train on ``split["train"]`` (the best epoch by ``split["valid"]``), score
    ``split["test"]``: a quality_table row (perplexity, tokens, training seconds, words/s)."""
    torch.manual_seed(seed)
    vocab = vocabulary(split["train"])
    train = stream(split["train"], vocab, columns=20)
    model = WordLM(len(vocab))
    lr, best, best_state, seconds = 20.0, math.inf, None, 0.0
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads: "
        f"{train.numel()} training tokens, vocabulary {len(vocab)}")
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train_epoch(model, train, lr)
        seconds += time.perf_counter() - start
        nll, n = sentence_nll(model, split["valid"], vocab)
        log(f"epoch {epoch}: valid ppl {math.exp(nll / n):.2f}, lr {lr:g}, "
            f"{seconds / 60:.1f} min")
        if nll < best:
            best, best_state = nll, {k: v.clone() for k, v in model.state_dict().items()}
        else:
            lr /= 4.0
        if seconds > minutes * 60:
            break
    model.load_state_dict(best_state)
    start = time.perf_counter()
    nll, n = sentence_nll(model, split["test"], vocab)
    rate = n / (time.perf_counter() - start)
    return {"method": f"PyTorch word_language_model (tied 2x200, {epoch} epochs)",
            "perplexity": math.exp(nll / n), "tokens": n, "train_seconds": seconds,
            "words_per_second": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--corpus", choices=("ptb", "kjv"), default="ptb")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--seed", type=int, default=1111)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {args.corpus}")
    row = torch_row(splits(args.data)[args.corpus], epochs=args.epochs,
                    minutes=args.minutes, seed=args.seed,
                    log=lambda line: print(line, flush=True))
    print_table(args.corpus, [row])


if __name__ == "__main__":
    main()
