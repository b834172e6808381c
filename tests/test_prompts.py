from __future__ import annotations

import numpy as np

from slim_ray.prompts import (
    TitleIndex, display_title, ground_items, named_aspects, parse_rationale, prompt_hash, split_names,
    student_messages, teacher_messages, validate,
)
from slim_ray.candidates import fill

ITEMS = [{"title": "Usual Suspects, The", "categories": ["Crime", "Thriller"], "brand": "", "year": "1995"},
         {"title": "Toy Story", "categories": ["Animation", "Comedy"], "brand": "", "year": "1995"}]


def test_display_title_moves_articles():
    assert display_title("Usual Suspects, The") == "The Usual Suspects"
    assert display_title("Convent, The (Convento, O)") == "The Convent (Convento, O)"
    assert display_title("Heat") == "Heat"


def test_teacher_prompt_has_history_candidates_and_three_steps():
    messages = teacher_messages(ITEMS[:1], ITEMS[1:], "movies", 5, ["Comedy", "Crime"])
    instruction, text = messages[0]["content"], messages[-1]["content"]
    assert "1. The Usual Suspects (1995) [Crime, Thriller]" in text
    assert text.endswith("- Toy Story (1995)") and "[Animation, Comedy]" not in text  # candidates by name
    assert all(f"Step {i}:" in instruction for i in (1, 2, 3))
    assert "genres" in instruction and "Choose from: Comedy, Crime." in instruction
    # the instruction is one system message for every user: a prefix-caching server reads it once
    assert teacher_messages(ITEMS[1:], ITEMS[:1], "movies", 5, ["Comedy", "Crime"])[0] == messages[0]
    products = teacher_messages([{**ITEMS[1], "brand": "Pixar"}], [], "products")
    assert "purchased" in products[0]["content"] and "brand: Pixar" in products[-1]["content"]
    assert "categories and brands" in products[0]["content"]


def test_student_prompt_is_short_and_carries_the_candidates():
    heat = {"title": "Heat", "categories": ["Crime"], "brand": "", "year": "1995"}
    messages = student_messages(ITEMS, [heat], "movies")
    text = messages[-1]["content"]
    assert "The Usual Suspects" in text and "Toy Story" in text and text.endswith("Candidates: Heat (1995).")
    assert len(messages[0]["content"] + text) < len(teacher_messages(ITEMS, [heat], "movies")[0]["content"] + text)
    # the instruction (every prompt's shared prefix) comes before the history
    assert messages[0] == student_messages(ITEMS[:1], [], "movies")[0] and "candidates" in messages[0]["content"]


def test_prompt_hash_depends_on_messages_and_params():
    m = teacher_messages(ITEMS, [], "movies")
    assert prompt_hash(m, model="a") == prompt_hash(m, model="a")
    assert prompt_hash(m, model="a") != prompt_hash(m, model="b")
    assert prompt_hash(m, model="a") != prompt_hash(teacher_messages(ITEMS[:1], [], "movies"), model="a")


def test_parse_rationale_variants():
    plain = parse_rationale("Step 1: likes crime.\nStep 2: Crime, Thriller\nStep 3: Heat, Casino")
    assert plain.parsed and plain.steps == ["likes crime.", "Crime, Thriller", "Heat, Casino"]
    markdown = parse_rationale("**Step 1:** a\n\n**Step 2** - b\n### Step 3. c")
    assert markdown.parsed and markdown.steps == ["a", "b", "c"]
    truncated = parse_rationale("Step 1: The user likes")
    assert not truncated.parsed and truncated.steps == ["The user likes", "", ""]
    assert not parse_rationale("").parsed


def test_split_names_and_grounding():
    assert split_names('1. "Heat" (1995)\n2. The Usual Suspects\n3. Toy Story [Animation]') == [
        "Heat", "The Usual Suspects", "Toy Story"]
    assert split_names("Recommended movies from the candidate list:\n- Star Wars (1977) [Action, Sci-Fi]\n"
                       "- The Usual Suspects (Crime)") == ["Star Wars", "The Usual Suspects"]
    assert split_names("Heat, Casino; Fargo") == ["Heat", "Casino", "Fargo"]
    index = TitleIndex.from_items([1, 2, 3], ["Usual Suspects, The", "Toy Story", "Heat"])
    assert index.lookup("the usual suspects") == 1 and index.lookup("Toy Storry") == 2
    assert index.lookup("Titanic") is None
    grounded = ground_items("Heat, Toy Story, Titanic", index, history_ids={2})
    assert grounded == {"named": 3, "in_catalogue": 2, "in_history": 1, "unknown": 1, "off_list": 0, "item_ids": [3]}


def test_validate_flags_but_keeps():
    index = TitleIndex.from_items([1, 2], ["Heat", "Toy Story"])
    result = validate("Step 1: x\nStep 2: Crime\nStep 3: Heat, Toy Story, Titanic", index, {2})
    assert result["parsed"] and set(result["flags"]) == {"history_item", "unknown_item"}
    assert validate("nonsense", index, set())["flags"] == ["unparsed", "no_items"]


def test_validator_counts_picks_outside_the_candidates():
    index = TitleIndex.from_items([1, 2, 3, 4], ["Heat", "Toy Story", "Casino", "Fargo"])
    text = "Step 1: x\nStep 2: Crime\nStep 3: Heat, Casino, Fargo"
    result = validate(text, index, history_ids={9}, candidate_ids={1, 4})
    assert result["off_list"] == 1 and "off_list" in result["flags"] and result["item_ids"] == [1, 3, 4]
    assert validate(text, index, {9}, {1, 3, 4})["flags"] == []


def test_named_aspects():
    assert named_aspects("Sci-Fi, film-noir and Drama.", ["Drama", "Sci-Fi", "Film-Noir", "War"]) == [
        "Drama", "Sci-Fi", "Film-Noir"]
    assert named_aspects("Warm comedies", ["War"]) == []


def test_candidates_skip_history_and_keep_their_rank():
    popular = np.array([5, 1, 2, 3, 4, 0, 6, 7])
    assert fill([7, 2], {1, 2}, popular, 4) == [7, 5, 3, 4]  # preferred first, then popular, ranked
