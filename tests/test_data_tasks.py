"""The synthetic task suite: determinism, correctness of answers, conflicts, disjoint splits."""

from __future__ import annotations

import ast
import datetime as dt
import json
import re
from collections import Counter

import pytest

from g2is_jax.data import (
    DISTRACTOR_DOMAINS,
    DOMAINS,
    build_pool,
    build_target,
    encode_records,
    load_records,
    suite,
)
from g2is_jax.errors import G2ISError
from g2is_jax.testing import tiny_tokenizer

# Conversion factors written out independently of the generator.
_FACTORS = {
    ("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60, ("liters", "milliliters"): 1000, ("feet", "inches"): 12,
    ("days", "hours"): 24, ("weeks", "days"): 7, ("yards", "feet"): 3,
}  # fmt: skip


def _solve(domain: str, prompt: str) -> str:
    """An independent solver: parses the prompt text and computes the right answer."""
    if domain == "arithmetic":
        expr = re.fullmatch(r"Compute (.+)\. Answer with the number only\.", prompt)[1]
        assert re.fullmatch(r"[\d +\-*()]+", expr)
        return str(eval(expr))  # digits and operators only (checked above)
    if domain == "unit_conversion":
        v, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\. Answer .*", prompt).groups()
        return str(int(v) * _FACTORS[src, dst])
    if domain == "word_sorting":
        words = re.fullmatch(r"Sort these words alphabetically: (.+)\.", prompt)[1].split(", ")
        return ", ".join(sorted(words))
    if domain == "boolean":
        expr = re.fullmatch(r"Evaluate: (.+)\. Answer True or False\.", prompt)[1]
        assert set(re.findall(r"\w+", expr)) <= {"True", "False", "and", "or", "not"}
        return str(eval(expr))  # boolean literals and operators only
    if domain == "list_ops":
        xs = ast.literal_eval(re.search(r"\[.*\]", prompt)[0])
        if prompt.startswith("Reverse"):
            out = xs[::-1]
        elif prompt.startswith("Remove the even"):
            out = [x for x in xs if x % 2 == 1]
        else:
            k = int(re.match(r"Add (\d+) ", prompt)[1])
            out = [x + k for x in xs]
        return str(out)
    if domain == "date_arithmetic":
        n, way, day = re.fullmatch(
            r"What date is (\d+) days (after|before) (\S+)\? Answer in YYYY-MM-DD format\.", prompt
        ).groups()
        delta = dt.timedelta(days=int(n) * (1 if way == "after" else -1))
        return (dt.date.fromisoformat(day) + delta).isoformat()
    raise AssertionError(domain)


@pytest.fixture(scope="module")
def pool():
    return build_pool(1200, seed=0)


def _key(records):
    return [(r.id, r.messages, dict(r.meta)) for r in records]


def test_pool_is_deterministic(pool):
    assert _key(build_pool(1200, seed=0)) == _key(pool)
    assert _key(build_pool(1200, seed=1)) != _key(pool)
    dev, _ = build_target("boolean", n_dev=8, n_test=20, seed=0)
    assert _key(build_target("boolean", n_dev=8, n_test=20, seed=0)[0]) == _key(dev)


def test_pool_composition(pool):
    assert len(pool) == 1200
    assert [r.id for r in pool] == [f"pool-{i:05d}" for i in range(1200)]
    kinds = Counter(r.meta["kind"] for r in pool)
    assert kinds["distractor"] == 360
    per_domain = Counter(r.meta["domain"] for r in pool if r.meta["kind"] != "distractor")
    assert set(per_domain) == set(DOMAINS) and set(per_domain.values()) == {140}
    conflicts = Counter(r.meta["domain"] for r in pool if r.meta["kind"] == "conflict")
    assert set(conflicts.values()) == {28}  # 20% of each domain
    assert {r.meta["domain"] for r in pool if r.meta["kind"] == "distractor"} <= set(
        DISTRACTOR_DOMAINS
    )
    assert len({r.messages[0].content for r in pool}) == 1200  # distinct prompts
    domains_in_order = [r.meta["domain"] for r in pool[:50]]
    assert len(set(domains_in_order)) > 3  # shuffled, not grouped


def test_every_record_is_labelled_and_short(pool):
    for r in pool:
        assert r.format == "messages"
        assert [m.role for m in r.messages] == ["user", "assistant"]
        assert set(r.meta) == {"domain", "kind", "answer", "correct"}
        assert r.meta["answer"] == r.messages[1].content == r.reference
        assert 0 < len(r.meta["answer"]) <= 60
    _, report = encode_records(pool, tiny_tokenizer(), max_length=128, progress=False)
    assert report.n_truncated == 0 and report.lengths.max() <= 128


def test_clean_answers_are_correct_and_conflicts_differ(pool):
    seen = Counter()
    for r in pool:
        domain, kind = r.meta["domain"], r.meta["kind"]
        if kind == "distractor":
            assert r.meta["answer"] == r.meta["correct"]
            continue
        right = _solve(domain, r.messages[0].content)
        assert r.meta["correct"] == right, r
        if kind == "clean":
            assert r.meta["answer"] == right
        else:
            assert r.meta["answer"] != right
        seen[kind] += 1
    assert seen["clean"] > 0 and seen["conflict"] > 0


def test_conflict_rules():
    pool = build_pool(600, seed=2, distractor_share=0.0, conflict_share=1.0)
    for r in pool:
        ans, right = r.meta["answer"], r.meta["correct"]
        match r.meta["domain"]:
            case "arithmetic":
                assert int(ans) == int(right) + 1
            case "word_sorting":
                assert ans.split(", ") == right.split(", ")[::-1]
            case "boolean":
                assert {ans, right} == {"True", "False"}
            case "unit_conversion":
                assert int(ans) == 10 * int(right)


def test_targets_are_clean_correct_and_disjoint(pool):
    pool_prompts = {r.messages[0].content for r in pool}
    other_pool = {r.messages[0].content for r in build_pool(1200, seed=7)}
    for domain in DOMAINS:
        dev, test = build_target(domain, n_dev=10, n_test=30, seed=0)
        assert len(dev) == 10 and len(test) == 30
        dev_p = {r.messages[0].content for r in dev}
        test_p = {r.messages[0].content for r in test}
        assert len(dev_p) == 10 and len(test_p) == 30
        assert not dev_p & test_p
        assert not (dev_p | test_p) & (pool_prompts | other_pool)
        for r in dev + test:
            assert r.meta["kind"] == "clean" and r.meta["domain"] == domain
            assert r.meta["answer"] == _solve(domain, r.messages[0].content)
        # Other seeds give other examples, still disjoint from the pool.
        dev2, _ = build_target(domain, n_dev=10, n_test=30, seed=5)
        assert {r.messages[0].content for r in dev2} != dev_p
        assert not {r.messages[0].content for r in dev2} & pool_prompts


def test_target_share():
    pool = build_pool(1000, seed=0, target="date_arithmetic", target_share=0.02)
    counts = Counter(r.meta["domain"] for r in pool if r.meta["kind"] != "distractor")
    assert counts["date_arithmetic"] == 20
    assert sum(counts.values()) == 700
    assert len(pool) == 1000


def test_bad_arguments():
    with pytest.raises(G2ISError, match="domains"):
        build_pool(10, domains=["poetry"])
    with pytest.raises(G2ISError, match="conflict_share"):
        build_pool(10, conflict_share=1.5)
    with pytest.raises(G2ISError, match="do not fit"):
        build_pool(10, target="boolean", target_share=0.9, distractor_share=0.5)
    with pytest.raises(G2ISError, match="target"):
        build_pool(10, target_share=0.1)
    with pytest.raises(G2ISError, match="n_dev"):
        build_target("boolean", n_dev=0)
    with pytest.raises(G2ISError, match="cannot draw"):
        build_target("unit_conversion", n_dev=1000)


def test_suite_writes_files_that_load_back(tmp_path):
    files = suite(
        tmp_path / "s", n_pool=200, n_dev=4, n_test=6, seed=3, domains=["arithmetic", "boolean"]
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "arithmetic.dev.jsonl",
        "arithmetic.test.jsonl",
        "boolean.dev.jsonl",
        "boolean.test.jsonl",
        "pool.jsonl",
        "suite.json",
    ]
    expected = build_pool(200, seed=3, domains=["arithmetic", "boolean"])
    assert load_records(files.pool) == expected
    dev, test = build_target("boolean", n_dev=4, n_test=6, seed=3)
    assert load_records(files.dev["boolean"]) == dev
    assert load_records(files.test["boolean"]) == test
    manifest = json.loads(files.manifest.read_text())
    assert manifest["seed"] == 3 and manifest["n_pool"] == 200
    assert sum(manifest["pool_counts"].values()) == 200
