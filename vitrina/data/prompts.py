"""Class labels as captions: prompt templates with English articles ("an eagle", "trousers")."""

from __future__ import annotations

import random
import re

# A small ensemble in the spirit of CLIP's: photos, drawings and emoji, since the offline data are
# garments, clip art and emoji.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of the {}.",
    "an emoji of a {}.",
    "a close-up photo of a {}.",
    "a black and white photo of a {}.",
    "an illustration of a {}.",
    "a cartoon of a {}.",
)

_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")
_A_EXCEPTIONS = ("uni", "use", "usu", "uti", "ure", "eu", "one", "once", "ewe")
_NOT_PLURAL_ENDINGS = ("ss", "us", "is", "ous")


def article(label: str) -> str:
    """'a', 'an', or '' for a plural label ("trousers", "ankle boots")."""
    words = label.split()
    if not words:
        return "a"
    last, first = words[-1].lower(), words[0].lower()
    if len(last) > 2 and last.endswith("s") and not last.endswith(_NOT_PLURAL_ENDINGS):
        return ""
    if first.startswith(_AN_EXCEPTIONS):
        return "an"
    if first.startswith(_A_EXCEPTIONS):
        return "a"
    return "an" if first[0] in "aeiou" else "a"


def fill_template(template: str, label: str) -> str:
    """``template`` with ``{}`` replaced by ``label``; an "a {}" gets the article the label needs."""
    chosen = article(label)
    text = re.sub(r"\ba \{\}", (chosen + " {}") if chosen else "{}", template)
    return text.replace("{}", label)


def prompts_for(label: str) -> list[str]:
    """Every template filled with ``label`` (the zero-shot ensemble); the first is the plain photo prompt."""
    return [fill_template(t, label) for t in PROMPT_TEMPLATES]


def caption_from_label(label: str, rng: random.Random) -> str:
    """One template, drawn with ``rng``, filled with ``label`` (a training caption for a labelled image)."""
    return fill_template(rng.choice(PROMPT_TEMPLATES), label)
