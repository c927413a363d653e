"""A synthetic instruction suite with exact answers: the embedded default for the demo and tests.

Six task domains (`DOMAINS`), each a generator of (prompt, correct answer, conflicting answer)
from a numpy `Generator`:

==================  ====================================  ==========================================
domain              prompt form                           conflict rule
==================  ====================================  ==========================================
arithmetic          Compute (7 + 5) * 3 - 4.              off by one (correct + 1)
unit_conversion     Convert 12 km to m.                   factor ten times too large
word_sorting        Sort these words alphabetically: ...  descending order
boolean             Evaluate: not (True and False) ...    negated value
list_ops            Reverse the list [3, 8, 1].           wrong rule (unchanged / complement / minus)
date_arithmetic     What date is 17 days after ...?       the other direction
==================  ====================================  ==========================================

Distractors (`DISTRACTOR_DOMAINS`: chit-chat, trivia, rewriting) are off-target instruction noise
with fixed answers. Answers are short (a number, a word list, True/False, a date, a short phrase),
so exact match is meaningful and a 135M model can learn them with LoRA; prompts are a few tens of
tokens. Every record is in the messages format (user prompt, assistant answer; no system turn,
so the template's default applies) with meta ``domain``, ``kind`` ("clean" | "conflict" |
"distractor"), ``answer`` (the assistant's text) and ``correct`` (the right answer; differs from
``answer`` exactly for conflicts).

Determinism and disjointness. Every draw comes from ``np.random.default_rng([seed, stream...])``
with a fixed stream per (domain, split), so the same arguments give the same records. A stable
hash of the prompt text assigns every possible prompt to one of pool / dev / test, and each split
only keeps prompts of its own part: the pool and the target dev and test sets never share a prompt,
whatever the seeds. Prompts are distinct within a split.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2is_jax.allocate import largest_remainder
from g2is_jax.data.formats import Message, Record, write_jsonl
from g2is_jax.errors import G2ISError
from g2is_jax.io import atomic_write, check_output_dir

__all__ = [
    "DISTRACTOR_DOMAINS",
    "DOMAINS",
    "KINDS",
    "SuiteFiles",
    "build_pool",
    "build_target",
    "suite",
    "write_jsonl",
]

DOMAINS = (
    "arithmetic",
    "unit_conversion",
    "word_sorting",
    "boolean",
    "list_ops",
    "date_arithmetic",
)
DISTRACTOR_DOMAINS = ("chitchat", "trivia", "rewrite")
KINDS = ("clean", "conflict", "distractor")

_WORDS = (
    "apple", "bread", "chair", "cloud", "dance", "eagle", "fence", "grape", "house", "island",
    "jelly", "knife", "lemon", "maple", "night", "ocean", "piano", "queen", "river", "stone",
    "tiger", "umbra", "violin", "water", "yacht", "zebra", "amber", "bench", "candle", "desert",
    "engine", "forest", "garden", "harbor", "ivory", "jacket", "kettle", "ladder", "meadow",
    "needle", "orange", "pepper", "quartz", "rocket", "silver", "tunnel", "velvet", "window",
    "basket", "copper", "dragon", "falcon", "ginger", "hammer", "insect", "jungle", "lizard",
    "marble", "nickel", "oyster", "pillow", "rabbit", "saddle", "turtle", "walnut", "button",
    "cactus", "dinner", "figure", "goblet", "helmet", "kitten", "lantern", "mirror", "nectar",
    "parrot", "radish", "sunset", "timber", "wizard",
)  # fmt: skip
_UNITS = (
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("feet", "inches", 12),
    ("days", "hours", 24), ("weeks", "days", 7), ("yards", "feet", 3),
)  # fmt: skip
_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kara",
    "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Wes", "Xena", "Yuki", "Zane", "Aria", "Bruno", "Cleo", "Dmitri", "Elena", "Felix",
    "Gita", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Marco", "Nina",
)  # fmt: skip
_GREETINGS = (
    ("Hi, my name is {}.", "Nice to meet you, {}!"),
    ("Good morning! I am {}.", "Good morning, {}!"),
    ("Please greet {}.", "Hello, {}!"),
    ("Say goodbye to {}.", "Goodbye, {}!"),
    ("Thank {} for the help.", "Thank you for your help, {}!"),
    ("Wish {} a happy birthday.", "Happy birthday, {}!"),
)
_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Russia", "Moscow"), ("China", "Beijing"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"),
)  # fmt: skip
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
    ("happy", "sad"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("high", "low"), ("rich", "poor"), ("loud", "quiet"), ("thick", "thin"), ("strong", "weak"),
    ("first", "last"), ("inside", "outside"), ("win", "lose"), ("push", "pull"), ("day", "night"),
)  # fmt: skip
_LEGS = (
    ("spider", 8), ("dog", 4), ("bird", 2), ("ant", 6), ("cat", 4), ("horse", 4),
    ("chicken", 2), ("cow", 4), ("duck", 2), ("bee", 6), ("beetle", 6), ("goat", 4),
)  # fmt: skip

# (prompt, correct answer, conflicting answer)
_Item = tuple[str, str, str]


def _pick(rng: np.random.Generator, seq: Sequence, k: int | None = None):
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    return [seq[int(i)] for i in rng.choice(len(seq), size=k, replace=False)]


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(rng.integers(low, high + 1))


def _arithmetic(rng: np.random.Generator) -> _Item:
    a, b, c, d = (_int(rng, 2, 20) for _ in range(4))
    forms = (
        (f"({a} + {b}) * {c}", (a + b) * c),
        (f"{a} * {b} - {c}", a * b - c),
        (f"{a} + {b} * {c} - {d}", a + b * c - d),
        (f"({a} - {b}) * {c} + {d}", (a - b) * c + d),
        (f"{a} * ({b} + {c}) - {d}", a * (b + c) - d),
    )
    text, value = _pick(rng, forms)
    return f"Compute {text}. Answer with the number only.", str(value), str(value + 1)


def _unit_conversion(rng: np.random.Generator) -> _Item:
    src, dst, factor = _pick(rng, _UNITS)
    v = _int(rng, 1, 500)
    prompt = f"Convert {v} {src} to {dst}. Answer with the number only."
    return prompt, str(v * factor), str(v * factor * 10)


def _word_sorting(rng: np.random.Generator) -> _Item:
    words = _pick(rng, _WORDS, _int(rng, 3, 5))
    prompt = f"Sort these words alphabetically: {', '.join(words)}."
    return prompt, ", ".join(sorted(words)), ", ".join(sorted(words, reverse=True))


def _bool_expr(rng: np.random.Generator, depth: int) -> tuple[str, bool, bool]:
    """(text, value, is_binary); binary operands are parenthesized, so the text evaluates the
    same in Python."""
    if depth == 0 or rng.random() < 0.25:
        value = bool(rng.integers(2))
        return str(value), value, False
    op = _pick(rng, ("and", "or", "and", "or", "not"))
    if op == "not":
        text, value, binary = _bool_expr(rng, depth - 1)
        return (f"not ({text})" if binary else f"not {text}"), not value, False
    (lt, lv, lb), (rt, rv, rb) = _bool_expr(rng, depth - 1), _bool_expr(rng, depth - 1)
    left, right = (f"({lt})" if lb else lt), (f"({rt})" if rb else rt)
    return f"{left} {op} {right}", (lv and rv) if op == "and" else (lv or rv), True


def _boolean(rng: np.random.Generator) -> _Item:
    while True:  # 2 to 4 binary operators (3 to 5 literals), nested up to 3 deep
        text, value, binary = _bool_expr(rng, 3)
        if binary and 2 <= text.count(" and ") + text.count(" or ") <= 4:
            break
    return f"Evaluate: {text}. Answer True or False.", str(value), str(not value)


def _fmt_list(xs: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, xs)) + "]"


def _list_ops(rng: np.random.Generator) -> _Item:
    xs = [int(x) for x in rng.choice(np.arange(1, 21), size=_int(rng, 3, 6), replace=False)]
    op = _int(rng, 0, 2)
    if op == 0:
        prompt = f"Reverse the list {_fmt_list(xs)}."
        return prompt, _fmt_list(xs[::-1]), _fmt_list(xs)
    if op == 1:
        prompt = f"Remove the even numbers from {_fmt_list(xs)}."
        odds, evens = [x for x in xs if x % 2], [x for x in xs if x % 2 == 0]
        return prompt, _fmt_list(odds), _fmt_list(evens)
    k = _int(rng, 1, 9)
    prompt = f"Add {k} to each number in {_fmt_list(xs)}."
    return prompt, _fmt_list([x + k for x in xs]), _fmt_list([x - k for x in xs])


def _date_arithmetic(rng: np.random.Generator) -> _Item:
    start = dt.date(2000, 1, 1) + dt.timedelta(days=_int(rng, 0, 11322))  # to 2030-12-31
    n = _int(rng, 1, 60)
    sign = 1 if rng.random() < 0.5 else -1
    word = "after" if sign > 0 else "before"
    prompt = f"What date is {n} days {word} {start.isoformat()}? Answer in YYYY-MM-DD format."
    correct = start + dt.timedelta(days=sign * n)
    wrong = start - dt.timedelta(days=sign * n)
    return prompt, correct.isoformat(), wrong.isoformat()


def _chitchat(rng: np.random.Generator) -> _Item:
    prompt, answer = _pick(rng, _GREETINGS)
    name = _pick(rng, _NAMES)
    return prompt.format(name), answer.format(name), answer.format(name)


def _trivia(rng: np.random.Generator) -> _Item:
    kind = _int(rng, 0, 2)
    if kind == 0:
        country, city = _pick(rng, _CAPITALS)
        prompt, answer = f"What is the capital of {country}?", city
    elif kind == 1:
        word, opposite = _pick(rng, _OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        prompt, answer = f"What is the opposite of '{word}'?", opposite
    else:
        animal, legs = _pick(rng, _LEGS)
        prompt, answer = f"How many legs does a {animal} have?", str(legs)
    return prompt, answer, answer


def _rewrite(rng: np.random.Generator) -> _Item:
    phrase = " ".join(_pick(rng, _WORDS, _int(rng, 2, 4)))
    if rng.random() < 0.5:
        return f"Rewrite in uppercase: {phrase}", phrase.upper(), phrase.upper()
    return f"Rewrite in title case: {phrase}", phrase.title(), phrase.title()


_GENERATORS: dict[str, Callable[[np.random.Generator], _Item]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "word_sorting": _word_sorting,
    "boolean": _boolean,
    "list_ops": _list_ops,
    "date_arithmetic": _date_arithmetic,
    "chitchat": _chitchat,
    "trivia": _trivia,
    "rewrite": _rewrite,
}
_ALL = DOMAINS + DISTRACTOR_DOMAINS
_SPLITS = ("pool", "dev", "test")


def _part(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash: 1/8 dev, 1/8 test, 3/4 pool."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 8
    return "dev" if h == 0 else "test" if h == 1 else "pool"


def _draw(domain: str, n: int, *, seed: int, split: str, partition: bool = True) -> list[_Item]:
    """``n`` items with distinct prompts from one deterministic stream of ``domain``."""
    rng = np.random.default_rng([seed, _ALL.index(domain), _SPLITS.index(split)])
    generate = _GENERATORS[domain]
    seen: set[str] = set()
    out: list[_Item] = []
    misses = 0  # consecutive draws without a new prompt: the space is (nearly) exhausted
    while len(out) < n and misses < 5000:
        item = generate(rng)
        if item[0] in seen or (partition and _part(item[0]) != split):
            misses += 1
            continue
        misses = 0
        seen.add(item[0])
        out.append(item)
    if len(out) < n:
        raise G2ISError(
            f"cannot draw {n} distinct {split} prompts for domain {domain!r} (got {len(out)}). "
            "Fix: ask for fewer records"
        )
    return out


def _record(rid: str, domain: str, kind: str, prompt: str, answer: str, correct: str) -> Record:
    return Record(
        messages=(Message("user", prompt), Message("assistant", answer)),
        format="messages",
        id=rid,
        meta={"domain": domain, "kind": kind, "answer": answer, "correct": correct},
    )


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder,
    equal remainders to the earlier domain first)."""
    counts = largest_remainder(total, weights, ties="earlier", normalize=True)
    return [int(c) for c in counts]


def _check_share(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise G2ISError(f"{name} must be in [0, 1], got {value!r}")


def _check_domains(domains: Sequence[str]) -> None:
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise G2ISError(
            f"domains must be distinct names from {', '.join(DOMAINS)}; got {list(domains)!r}"
        )


def build_pool(
    n: int = 3000,
    *,
    seed: int = 0,
    domains: Sequence[str] = DOMAINS,
    target: str | None = None,
    target_share: float | None = None,
    conflict_share: float = 0.2,
    distractor_share: float = 0.3,
) -> list[Record]:
    """A shuffled mixed pool of ``n`` records with ids ``pool-00000`` ... in file order.

    ``distractor_share`` of the pool are distractors; the rest are task records spread evenly
    over ``domains``, except that with ``target`` and ``target_share`` that domain makes up
    ``target_share`` of the whole pool. ``conflict_share`` of each domain's records are conflicts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise G2ISError(f"pool size must be a positive integer, got {n!r}")
    _check_domains(domains)
    _check_share("conflict_share", conflict_share)
    _check_share("distractor_share", distractor_share)
    n_distractor = round(n * distractor_share)
    n_task = n - n_distractor
    if target_share is not None:
        _check_share("target_share", target_share)
        if target not in domains:
            raise G2ISError(f"target_share needs a target among the domains, got {target!r}")
        n_target = round(n * target_share)
        if n_target > n_task or (len(domains) == 1 and n_target != n_task):
            raise G2ISError(
                f"target_share {target_share} and distractor_share {distractor_share} do not fit "
                "in one pool. Fix: make them sum to at most 1 (exactly 1 with a single domain)"
            )
        others = [d for d in domains if d != target]
        counts = dict(zip(others, _allocate(n_task - n_target, [1.0] * len(others)), strict=True))
        counts[target] = n_target
    else:
        counts = dict(zip(domains, _allocate(n_task, [1.0] * len(domains)), strict=True))

    rows: list[tuple[str, str, str, str, str]] = []  # domain, kind, prompt, answer, correct
    for domain in domains:
        items = _draw(domain, counts[domain], seed=seed, split="pool")
        n_conflict = round(counts[domain] * conflict_share)
        for j, (prompt, correct, wrong) in enumerate(items):
            kind, answer = ("conflict", wrong) if j < n_conflict else ("clean", correct)
            rows.append((domain, kind, prompt, answer, correct))
    rows += _distractors(n_distractor, seed)
    order = np.random.default_rng([seed, len(_ALL)]).permutation(len(rows))
    return [_record(f"pool-{i:05d}", *rows[j]) for i, j in enumerate(order)]


def _distractors(n: int, seed: int) -> list[tuple[str, str, str, str, str]]:
    # chit-chat and trivia have small prompt spaces; the rest are rewrites (unbounded).
    k = _allocate(n, [1.0, 1.0, 1.0])
    n_chat, n_trivia = min(k[0], 120), min(k[1], 60)
    counts = {"chitchat": n_chat, "trivia": n_trivia, "rewrite": n - n_chat - n_trivia}
    rows = []
    for domain, count in counts.items():
        for prompt, answer, _ in _draw(domain, count, seed=seed, split="pool", partition=False):
            rows.append((domain, "distractor", prompt, answer, answer))
    return rows


def build_target(
    domain: str, *, n_dev: int = 16, n_test: int = 100, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Clean (dev, test) records of one domain, disjoint from each other and from any pool."""
    _check_domains([domain])
    for name, value in (("n_dev", n_dev), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise G2ISError(f"{name} must be a positive integer, got {value!r}")
    out = []
    for split, count in (("dev", n_dev), ("test", n_test)):
        items = _draw(domain, count, seed=seed, split=split)
        out.append(
            [
                _record(f"{domain}-{split}-{i:04d}", domain, "clean", prompt, correct, correct)
                for i, (prompt, correct, _) in enumerate(items)
            ]
        )
    return out[0], out[1]


def _with_system(records: Sequence[Record], system: str) -> list[Record]:
    return [dataclasses.replace(r, messages=(Message("system", system), *r.messages))
            for r in records]


@dataclass(frozen=True)
class SuiteFiles:
    """Paths written by `suite`."""

    root: Path
    pool: Path
    dev: dict[str, Path]
    test: dict[str, Path]
    manifest: Path


def suite(
    out_dir: str | Path,
    *,
    n_pool: int = 3000,
    n_dev: int = 16,
    n_test: int = 100,
    seed: int = 0,
    domains: Sequence[str] = DOMAINS,
    target: str | None = None,
    target_share: float | None = None,
    conflict_share: float = 0.2,
    distractor_share: float = 0.3,
    system: str | None = None,
) -> SuiteFiles:
    """Write ``pool.jsonl``, ``{domain}.dev.jsonl``, ``{domain}.test.jsonl`` for every domain and
    ``suite.json`` (the arguments and per-file counts) to ``out_dir``. Everything is built before
    anything is written, and each file is written atomically.

    ``system``, when given, becomes every record's system message. Chat templates that insert a
    default system prompt otherwise (SmolLM2's is ~20 tokens) then use this one instead, which
    shortens every record.
    """
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise G2ISError(f"system must be a non-empty string or None, got {system!r}")
    check_output_dir(out_dir, "out_dir")
    pool = build_pool(
        n_pool,
        seed=seed,
        domains=domains,
        target=target,
        target_share=target_share,
        conflict_share=conflict_share,
        distractor_share=distractor_share,
    )
    targets = {d: build_target(d, n_dev=n_dev, n_test=n_test, seed=seed) for d in domains}
    if system is not None:
        pool = _with_system(pool, system)
        targets = {d: (_with_system(dev, system), _with_system(test, system))
                   for d, (dev, test) in targets.items()}
    root = Path(out_dir)
    files = SuiteFiles(
        root=root,
        pool=write_jsonl(pool, root / "pool.jsonl"),
        dev={d: write_jsonl(dev, root / f"{d}.dev.jsonl") for d, (dev, _) in targets.items()},
        test={d: write_jsonl(test, root / f"{d}.test.jsonl") for d, (_, test) in targets.items()},
        manifest=root / "suite.json",
    )
    counts = Counter(f"{r.meta['domain']}/{r.meta['kind']}" for r in pool)
    manifest = {
        "seed": seed,
        "n_pool": n_pool,
        "n_dev": n_dev,
        "n_test": n_test,
        "domains": list(domains),
        "target": target,
        "target_share": target_share,
        "conflict_share": conflict_share,
        "distractor_share": distractor_share,
        "system": system,
        "pool_counts": dict(sorted(counts.items())),
    }
    atomic_write(files.manifest, json.dumps(manifest, indent=2) + "\n")
    return files
