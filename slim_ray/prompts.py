"""Prompt templates (versioned, in one place), the 3-step rationale parser and its validators.

Teacher: zero-shot chain of thought over the user's chronological history, grounded by a candidate
list: Step 1 preferences -> Step 2 genres/categories -> Step 3 concrete items from the candidates.
Student: the same history and the same candidates with a shorter instruction (SLIM's simplified
prompt), so that its step 3 is a user-specific choice among real items.
Change PROMPT_VERSION whenever a template changes: it is part of every cache key and prompt hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import pandas as pd
from rapidfuzz import fuzz, process

PROMPT_VERSION = "v3"

_DOMAIN = {
    "movies": {"did": "watched", "things": "movies", "aspects": "genres"},
    "products": {"did": "purchased", "things": "products", "aspects": "categories and brands"},
}

TEACHER_SYSTEM = ("You are an expert recommender system. You reason step by step about a user's "
                  "history and answer in exactly the requested format.")
STUDENT_SYSTEM = "You are a helpful recommender system."


def display_title(title: str) -> str:
    """'Usual Suspects, The' -> 'The Usual Suspects' (catalogue titles put articles last)."""
    match = re.match(r"^(.*), (The|A|An|Les|La|Le|Il|Das|Der|Die|El)(\s*\(.*\))?$", title.strip())
    if match:
        return f"{match.group(2)} {match.group(1)}{match.group(3) or ''}"
    return title.strip()


def item_name(item: dict) -> str:
    """'Usual Suspects, The' + 1995 -> 'The Usual Suspects (1995)'."""
    text = display_title(item["title"])
    if item.get("year") and str(item["year"]) not in text:
        text += f" ({item['year']})"
    return text


def describe_item(item: dict, domain: str) -> str:
    """One line for an item: title (year) [genres] or title [categories; brand]."""
    text = item_name(item)
    categories = item.get("categories")
    aspects = [str(c) for c in categories] if categories is not None else []  # list or numpy array
    if domain == "products" and item.get("brand"):
        aspects.append(f"brand: {item['brand']}")
    return f"{text} [{', '.join(aspects)}]" if aspects else text


def teacher_messages(history: list[dict], candidates: list[dict], domain: str, n_recommend: int = 5,
                     aspect_vocabulary: list[str] | None = None) -> list[dict]:
    """The instruction is the system message, the same for every user, so that a server with prefix
    caching (llama.cpp, vLLM) reads it once; the user's history and candidates follow."""
    words = _DOMAIN[domain]
    vocabulary = f" Choose from: {', '.join(aspect_vocabulary)}." if aspect_vocabulary else ""
    instruction = "\n".join([
        TEACHER_SYSTEM, "",
        f"You get the {words['things']} a user has {words['did']} (oldest first) and candidate {words['things']} "
        f"they have not {words['did']} yet, ranked by a recommender model, most likely first. Answer in exactly "
        "three lines:",
        "Step 1: the user's preferences, in one sentence.",
        f"Step 2: exactly three {words['aspects']} the user will most likely want next, comma-separated.{vocabulary}",
        f"Step 3: exactly {n_recommend} of the candidates, the ones the user will most likely want next, best "
        f"first, titles only, comma-separated. Never a {words['things'][:-1]} from the history.",
        # A worked example steers a small teacher better than instructions alone (an ad hoc A/B against an
        # all-placeholder format favoured it on step-2 genre hits); titles stay placeholders, never copied.
        "", "Example answer (for another user):",
        "Step 1: The user enjoys thoughtful dramas and romantic comedies from the 1990s." if domain == "movies"
        else "Step 1: The user buys durable cast-iron cookware and kitchen tools.",
        "Step 2: Drama, Romance, Comedy" if domain == "movies" else "Step 2: Kitchen, Cookware, Lodge",
        "Step 3: " + ", ".join(["<title>"] * n_recommend),
    ])
    lines = [f"{words['did'].capitalize()}, oldest first:"]
    lines += [f"{i}. {describe_item(item, domain)}" for i, item in enumerate(history, start=1)]
    # Candidates by name only: with their genre tags the teacher copies the tags into step 3,
    # which made step 3 ~60% of its (slow, ~11 tok/s on CPU) output tokens.
    lines += ["", f"Candidate {words['things']}, most likely first:"] + [f"- {item_name(item)}" for item in candidates]
    return [{"role": "system", "content": instruction}, {"role": "user", "content": "\n".join(lines)}]


def student_messages(history: list[dict], candidates: list[dict], domain: str) -> list[dict]:
    """SLIM's simplified prompt, grounded like the teacher's: step 3 picks among the same candidates.
    The instruction (system message) comes first and the user's history and candidates last."""
    words = _DOMAIN[domain]
    instruction = (f"{STUDENT_SYSTEM} Given the {words['things']} a user {words['did']} in order and candidate "
                   f"{words['things']} (most likely first), Step 1: summarize the user's preferences. Step 2: name "
                   f"the {words['aspects']} they will want next. Step 3: recommend {words['things']} from the "
                   "candidates.")
    listing = "; ".join(describe_item(item, domain) for item in history)
    offered = "; ".join(item_name(item) for item in candidates)
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": f"{words['did'].capitalize()}: {listing}.\nCandidates: {offered}."}]


def prompt_hash(messages: list[dict], **params) -> str:
    """Content address of a request: template version + messages + generation parameters."""
    blob = json.dumps({"v": PROMPT_VERSION, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- parsing

_STEP = re.compile(r"^[\s*#>_-]*step\s*([123])\s*[*_]*\s*[:.)\-–]?[*_]*\s*", re.I | re.M)


@dataclass
class ParsedRationale:
    steps: list[str]  # always three strings ("" where missing)
    parsed: bool      # all three steps present and non-empty


def parse_rationale(text: str) -> ParsedRationale:
    """Split 'Step 1: ... Step 2: ... Step 3: ...' (markdown-tolerant) into its three steps."""
    marks = [(m.start(), m.end(), int(m.group(1))) for m in _STEP.finditer(text or "")]
    steps = ["", "", ""]
    for i, (_, end, number) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        if not steps[number - 1]:
            steps[number - 1] = text[end:stop].strip()
    return ParsedRationale(steps, all(steps))


def split_names(step: str) -> list[str]:
    """Item names in a step: one per list line when it is a list, else comma-separated.

    'Recommended:\n1. Heat (1995) [Action, Crime]\n2. "Casino"' -> ['Heat', 'Casino'];
    'Heat, Casino and more' -> ['Heat', 'Casino and more']. Lead-in lines ending in ':' are dropped,
    and so are bracketed/parenthesised details (years, genres).
    """
    lines = [line.strip() for line in step.splitlines() if line.strip() and not line.strip().endswith(":")]
    listed = [line for line in lines if re.match(r"^(\d+[.)]|[-*•])\s+", line)]
    parts = listed if len(listed) >= 2 else re.split(r"[,;\n]|\s\d+[.)]\s", "\n".join(lines))
    names = []
    for part in parts:
        part = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", part)
        part = re.sub(r"\[[^\]]*\]|\([^)]*\)|\*", "", part).strip(" \"'“”.`:")
        if part and len(part) <= 120:
            names.append(part)
    return names


def normalize_title(title: str) -> str:
    title = display_title(title).lower()
    title = re.sub(r"\(\d{4}\)", " ", title)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", title).split())


@dataclass
class TitleIndex:
    """Fuzzy title -> item id lookup over the catalogue (exact normalised title first, else rapidfuzz's
    best normalised Indel similarity, the measure difflib's ratio approximates, computed in C)."""

    titles: dict[str, int]
    _keys: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self._keys = list(self.titles)

    @classmethod
    def from_items(cls, item_ids, titles) -> "TitleIndex":
        index: dict[str, int] = {}
        for item_id, title in zip(item_ids, titles):
            index.setdefault(normalize_title(title), int(item_id))
        return cls(index)

    def match(self, name: str, cutoff: float = 0.85) -> tuple[int, float] | None:
        """(item id, similarity of the normalised name to its title in [cutoff, 1]) or None."""
        key = normalize_title(name)
        if key in self.titles:
            return self.titles[key], 1.0
        close = process.extractOne(key, self._keys, scorer=fuzz.ratio, score_cutoff=100 * cutoff)
        return (self.titles[close[0]], close[1] / 100) if close else None

    def lookup(self, name: str, cutoff: float = 0.85) -> int | None:
        found = self.match(name, cutoff)
        return found[0] if found else None


def ground_items(step3: str, index: TitleIndex, history_ids: set[int], candidate_ids: set[int] | None = None) -> dict:
    """Which step-3 names resolve to catalogue items, which of those were already seen, and how many
    unseen ones are not among the prompt's candidates (off_list; 0 when no candidates are given)."""
    names = split_names(step3)
    resolved = [index.lookup(name) for name in names]
    known = [i for i in resolved if i is not None]
    fresh = [i for i in known if i not in history_ids]
    off = [i for i in fresh if candidate_ids is not None and i not in candidate_ids]
    return {"named": len(names), "in_catalogue": len(known), "in_history": len(known) - len(fresh),
            "unknown": len(names) - len(known), "off_list": len(off), "item_ids": fresh}


def named_aspects(step2: str, vocabulary: list[str]) -> list[str]:
    """Vocabulary entries (genres/categories) named in step 2, matched case-insensitively."""
    text = " " + re.sub(r"[^a-z0-9']+", " ", step2.lower()) + " "
    found = []
    for aspect in vocabulary:
        key = " " + re.sub(r"[^a-z0-9']+", " ", aspect.lower()).strip() + " "
        if key.strip() and key in text:
            found.append(aspect)
    return found


def validate(text: str, index: TitleIndex, history_ids: set[int], candidate_ids: set[int] | None = None) -> dict:
    """Parse + grounding flags for one rationale (kept even when flagged)."""
    parsed = parse_rationale(text)
    grounding = ground_items(parsed.steps[2], index, history_ids, candidate_ids)
    flags = [name for name, bad in (("unparsed", not parsed.parsed),
                                    ("history_item", grounding["in_history"] > 0),
                                    ("unknown_item", grounding["unknown"] > 0),
                                    ("off_list", grounding["off_list"] > 0),
                                    ("no_items", grounding["named"] == 0)) if bad]
    return {"steps": parsed.steps, "parsed": parsed.parsed, "flags": flags, **grounding}


def aspect_vocabulary(items: pd.DataFrame, limit: int = 30) -> list[str]:
    """Genres/categories by frequency; shown in the prompt only when the vocabulary is small."""
    counts = pd.Series([c for cats in items["categories"] for c in cats if c != "unknown"]).value_counts()
    return sorted(counts.index.tolist()) if 0 < len(counts) <= limit else []
