"""Which strategy did a response actually use? A transparent, rule-based classifier.

Categories (first rule that fires):
  recall-first   opens with facts or definitions ("Relevant facts:", "Recall", "We know that", "Facts:")
  extract-first  opens by quoting the input ("Extracted:", a quoted line)
  step-by-step   two or more numbered / "Step k" lines, or two or more lines of computation (with '=')
  explanation    two or more sentences of prose before the answer, without numbered steps
  direct         anything shorter: the answer with at most a sentence around it
This is the measurable trace of "learned to choose a strategy": a student trained on erased traces
should answer one-step tasks directly and work multi-step ones in steps, without being told to.
"""

from __future__ import annotations

import re

CATEGORIES = ("direct", "step-by-step", "recall-first", "extract-first", "explanation")

_RECALL = re.compile(
    r"^\s*(?:\**\s*)?(?:relevant facts|facts|recall|we know(?: that)?|known|definitions?|background)\b", re.IGNORECASE
)
_EXTRACT = re.compile(
    r"^\s*(?:\**\s*)?(?:extracted|quotes?|from the (?:question|text|passage))\b|^\s*[\"“]", re.IGNORECASE
)
_STEP_LINE = re.compile(r"^\s*(?:\(?\d+[.):]|step\s*\d+\b|[-*•]\s+\S.*=)", re.IGNORECASE | re.MULTILINE)
_CALC_LINE = re.compile(r"^[^\n]*\d[^\n]*=[^\n]*\d", re.MULTILINE)
_ANSWER_LINE = re.compile(r"^\s*(?:the (?:final )?answer is|final answer|answer)\b.*$", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def classify(response: str) -> str:
    """The strategy a response shows, one of CATEGORIES."""
    text = response.strip()
    if not text:
        return "direct"
    head = text[:200]
    if _RECALL.search(head):
        return "recall-first"
    if _EXTRACT.search(head):
        return "extract-first"
    if len(_STEP_LINE.findall(text)) >= 2 or len(_CALC_LINE.findall(text)) >= 2:
        return "step-by-step"
    body = _ANSWER_LINE.sub("", text).strip()
    if len(_SENTENCE_END.findall(body)) >= 2 and len(body.split()) > 20:
        return "explanation"
    return "direct"
