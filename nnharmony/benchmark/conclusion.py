"""The conclusion printed under the table, computed from the per-case numbers (nothing is written in advance).

Per member, each method's score of a validation case is its Dice averaged over the member's labels; the methods
are ranked by the mean over cases. The best method's lead over the runner-up is called larger than the spread when
it exceeds both methods' standard deviation over the cases, and the paired count (on how many of the same cases
the best method scored higher) is given. A member with few training cases gets one more line: the best
collection-trained method against the per-dataset model, i.e. whether training on the other members helped it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: a member with fewer training cases than this is called few-shot in the conclusion
FEW_SHOT_CASES = 5


@dataclass(frozen=True)
class Score:
    method: str
    mean: float
    std: float  # sample std over cases (0 for one case)
    per_case: dict[str, float]


def case_scores(per_case: Sequence[Mapping], member: str, method: str) -> dict[str, float]:
    """case -> Dice averaged over the member's labels (labels with an undefined Dice left out)."""
    by_case: dict[str, list[float]] = {}
    for r in per_case:
        d = r.get("dice")
        if r["member"] == member and r["method"] == method and d is not None and math.isfinite(d):
            by_case.setdefault(r["case"], []).append(float(d))
    return {c: float(np.mean(v)) for c, v in by_case.items()}


def member_scores(per_case: Sequence[Mapping], member: str, methods: Sequence[str]) -> list[Score]:
    """The methods with numbers on ``member``, best first."""
    out = []
    for m in methods:
        cs = case_scores(per_case, member, m)
        if cs:
            v = np.array(list(cs.values()))
            out.append(Score(m, float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, cs))
    return sorted(out, key=lambda s: -s.mean)


def _lead(a: Score, b: Score) -> str:
    diff = a.mean - b.mean
    spread = max(a.std, b.std)
    common = sorted(set(a.per_case) & set(b.per_case))
    wins = sum(a.per_case[c] > b.per_case[c] for c in common)
    size = "larger" if diff > spread else "not larger"
    return (f"{diff:+.3f} over {b.method} ({b.mean:.3f}), {size} than the spread over validation cases "
            f"(std up to {spread:.3f}); higher on {wins} of {len(common)} cases")


def conclusion_lines(per_case: Sequence[Mapping], members: Sequence[Mapping], methods: Sequence[str],
                     paradigms: Mapping[str, str]) -> list[str]:
    """Markdown bullet lines; ``members``: ``{"name", "training_cases"}``; ``paradigms``: method -> paradigm."""
    lines = []
    overall: dict[str, list[float]] = {}
    for mem in members:
        scores = member_scores(per_case, mem["name"], methods)
        if not scores:
            continue
        for s in scores:
            overall.setdefault(s.method, []).append(s.mean)
        n_train = mem.get("training_cases")
        head = f"**{mem['name']}**" + (f" ({n_train} training cases)" if n_train is not None else "")
        if len(scores) == 1:
            lines.append(f"- {head}: only {scores[0].method} has numbers ({scores[0].mean:.3f}).")
        else:
            worst = scores[-1]
            lines.append(f"- {head}: best {scores[0].method} ({scores[0].mean:.3f}), {_lead(scores[0], scores[1])}; "
                         f"last {worst.method} ({worst.mean:.3f}).")
        if n_train is not None and n_train < FEW_SHOT_CASES:
            lines += _few_shot_line(scores, paradigms)
    complete = {m: v for m, v in overall.items() if len(v) == len([x for x in members])}
    if complete:
        ranked = sorted(complete, key=lambda m: -float(np.mean(complete[m])))
        lines.append("- **Over all members** (mean of the member means): " + ", ".join(
            f"{m} {np.mean(complete[m]):.3f}" for m in ranked) + ".")
    return lines


def _few_shot_line(scores: Sequence[Score], paradigms: Mapping[str, str]) -> list[str]:
    per_dataset = [s for s in scores if paradigms.get(s.method) == "per-dataset"]
    collection = [s for s in scores if paradigms.get(s.method) == "collection"]
    if not per_dataset or not collection:
        return []
    own, joint = per_dataset[0], collection[0]
    if joint.mean > own.mean:
        return [f"  - few training cases: training on the whole collection helped here: {joint.method} "
                f"({joint.mean:.3f}) {_lead(joint, own)}."]
    return [f"  - few training cases: training on the whole collection did not help here: the per-dataset "
            f"{own.method} ({own.mean:.3f}) {_lead(own, joint)}."]
