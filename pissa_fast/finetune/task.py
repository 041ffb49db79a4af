"""A deterministic synthetic arithmetic task in the GSM8K / MetaMathQA style, built in memory.

Each example is a short word problem and a worked answer that ends like GSM8K's ("The answer is 14."),
e.g.

    Question: Mia has 23 apples. She buys 9 more and gives 12 to Leo. How many apples does Mia have now?
    Answer: Mia has 23 + 9 = 32 apples, then 32 - 12 = 20. The answer is 20.

Why this task: the paper fine-tunes on MetaMathQA (questions and chain-of-thought answers), which this
project cannot download; these problems have the same shape (a question, an arithmetic chain, a final
number), need no data files, are exactly reproducible from a seed, and are small enough to train on a
CPU. They are far easier than GSM8K: the benchmark measures how fast the loss falls, not what the model
learns.

`make_examples(n, seed)` is a pure function of (n, seed): the same list on every machine and Python
version (it uses only `random.Random` methods whose output is fixed by the seed). `encode` tokenizes with
the model's own tokenizer and masks everything but the answer (label -100), as the paper's training
script does, so the loss is the answer tokens' cross-entropy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels torch's cross-entropy (and transformers' causal-LM loss) skip

_NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
          ("Lily", "She"), ("Ivan", "He"), ("Sara", "She"), ("Ben", "He"), ("Nina", "She"), ("Raj", "He"))
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "eggs")


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the worked solution, ending "The answer is <value>."
    value: int


def _buy_give(rng: random.Random) -> Example:
    (name, pron), (friend, _) = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    total, left = a + b, a + b - c
    return Example(f"{name} has {a} {item}. {pron} buys {b} more and gives {c} to {friend}. "
                   f"How many {item} does {name} have now?",
                   f"{name} has {a} + {b} = {total} {item}, then {total} - {c} = {left}. The answer is {left}.", left)


def _change(rng: random.Random) -> Example:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(("notebook", "sandwich", "ticket", "toy car", "plant", "mug"))
    price, count = rng.randint(2, 15), rng.randint(2, 6)
    cost = price * count
    bill = rng.choice([b for b in (20, 50, 100) if b >= cost])
    change = bill - cost
    return Example(f"A {item} costs {price} dollars. {name} buys {count} of them and pays with a {bill} dollar "
                   f"bill. How much change does {pron.lower()} get?",
                   f"{count} * {price} = {cost} dollars, so the change is {bill} - {cost} = {change} dollars. "
                   f"The answer is {change}.", change)


def _rate(rng: random.Random) -> Example:
    name, pron = rng.choice(_NAMES)
    per_day, days = rng.randint(3, 40), rng.randint(2, 12)
    total = per_day * days
    return Example(f"{name} reads {per_day} pages every day. How many pages does {pron.lower()} read in {days} days?",
                   f"{pron} reads {per_day} * {days} = {total} pages. The answer is {total}.", total)


def _share(rng: random.Random) -> Example:
    name, _ = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    return Example(f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each "
                   f"friend get?",
                   f"Each friend gets {total} / {friends} = {each} {item}. The answer is {each}.", each)


def _rows(rng: random.Random) -> Example:
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    seats = rows * per_row
    taken = rng.randint(1, seats - 1)
    free = seats - taken
    return Example(f"A hall has {rows} rows of {per_row} chairs. {taken} chairs are taken. How many chairs are free?",
                   f"The hall has {rows} * {per_row} = {seats} chairs, and {seats} - {taken} = {free} are free. "
                   f"The answer is {free}.", free)


def _weeks(rng: random.Random) -> Example:
    name, pron = rng.choice(_NAMES)
    saved, weeks = rng.randint(3, 25), rng.randint(2, 8)
    total = saved * weeks
    spent = rng.randint(1, total - 1)
    left = total - spent
    return Example(f"{name} saves {saved} dollars a week for {weeks} weeks, then spends {spent} dollars on a game. "
                   f"How much money does {pron.lower()} have left?",
                   f"{pron} saves {saved} * {weeks} = {total} dollars and has {total} - {spent} = {left} left. "
                   f"The answer is {left}.", left)


TEMPLATES = (_buy_give, _change, _rate, _share, _rows, _weeks)


def make_examples(n: int, seed: int = 0) -> list[Example]:
    """`n` word problems, a pure function of (n, seed); the first k of make_examples(n) are make_examples(k)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES)(rng) for _ in range(n)]


def prompt(question: str) -> str:
    """The text the model is conditioned on; the answer follows after one space."""
    return f"Question: {question}\nAnswer:"


def encode(examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
    """Tokenize a batch: prompt + " " + answer + EOS, right-padded to the longest; labels are the answer
    tokens and EOS, -100 elsewhere (prompt and padding). Prompt and answer are tokenized apart so the
    boundary between them is exactly where the labels start."""
    if not examples:
        raise ValueError("encode needs at least one example")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; the answers end with EOS")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for ex in examples:
        p = tokenizer(prompt(ex.question), add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((p, a))
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(tokenizer, steps: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `batch_size` fresh examples (one pass, no example seen twice), the same for
    every method compared."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    examples = make_examples(steps * batch_size, seed)
    return [encode(examples[i * batch_size:(i + 1) * batch_size], tokenizer) for i in range(steps)]
