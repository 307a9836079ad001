"""Assistant spans for chat templates that are not prefix-stable: templates that render earlier turns
differently once later turns are added, as several families ship them:

- Qwen3: an assistant turn after the last user message gets a `<think>` block, earlier ones lose it;
- Mistral / Mixtral (v0.3 templates): the system prompt goes into the LAST user turn (and is dropped when the
  conversation ends with an answer, as training data does: that is the template's doing);
- Phi-3: the rendered conversation ends with eos_token, which a longer conversation has only at its end.

`data.assistant_spans` renders the prefix before and after each assistant turn; where that prefix is not a prefix
of the whole conversation it asks `spans_by_sentinels`: the conversation is rendered once more with every assistant
content replaced by a unique sentinel, which splits the rendering into the template's own text (P0, P1, ...,
identical in both renderings when the template does not look inside the contents) and the contents as the template
rendered them (trimmed or not). Each span is that content, plus the end-of-turn text that the template writes after
an assistant turn (what the prefix rendering puts after the content, as far as the conversation has it too), plus
the text it writes before the content when the conversation has all of it there (Mistral's space after [/INST]).
The whole conversation is checked to be exactly P0 c0 P1 c1 ... Pn; if not (a template that rewrites the
contents), None is returned and the caller refuses in one line as before.
"""

from __future__ import annotations

from typing import Callable

SENTINEL = "@@LORAFORGE-ANSWER-{}@@"


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _end_of_turn(post: str, following: str) -> int:
    """How much of `post` (what the template writes after an assistant content when the turn is the last) the
    conversation also has after it: their common prefix, cut back to a marker's end (whitespace, '>' or ']'), so
    that Phi-3's "<|end|>\\n<|endoftext|>" against "<|end|>\\n<|user|>" gives "<|end|>\\n", never "<|end|>\\n<|"."""
    n = _common_prefix(post, following)
    if n == len(post):
        return n
    while n and not (post[n - 1].isspace() or post[n - 1] in ">]"):
        n -= 1
    return n


def _after_prompt(head: str, prompt: str) -> str:
    """What the rendering of a conversation ending in an answer has between the generation prompt's end and the
    answer (Mistral: the space after [/INST]): `head` after the last occurrence of the longest tail of `prompt` it
    contains (the prompt itself may differ: Mistral's drops the system prompt once the answer follows)."""
    for n in range(len(prompt), 0, -1):
        at = head.rfind(prompt[-n:])
        if at >= 0:
            return head[at + n:]
    return ""


def spans_by_sentinels(render: Callable[[list[dict], bool], str], messages: list[dict],
                       full: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in `full` (= render(messages, False)), or None if they cannot be
    located. `render(messages, add_generation_prompt)` renders with the tokenizer's (or the recipe's) template."""
    marked, order = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            marked.append({**m, "content": SENTINEL.format(len(order))})
            order.append(i)
        else:
            marked.append(m)
    skeleton = render(marked, False)
    pieces, rest = [], skeleton
    for k in range(len(order)):
        head, sep, rest = rest.partition(SENTINEL.format(k))
        if not sep or SENTINEL.format(k) in rest:
            return None  # a sentinel dropped or repeated: the template does not render contents verbatim
        pieces.append(head)
    pieces.append(rest)

    # the contents as rendered, between the template's own pieces
    if not full.startswith(pieces[0]) or not full.endswith(pieces[-1]):
        return None
    contents, at = [], len(pieces[0])
    for k in range(len(order)):
        nxt = pieces[k + 1]
        end = len(full) - len(nxt) if k == len(order) - 1 else full.find(nxt, at)
        if end < at:
            return None
        contents.append((at, end))
        at = end + len(nxt)
    if at != len(full):
        return None

    spans = []
    for k, i in enumerate(order):
        start, end = contents[k]
        before = render(marked[:i], True)
        head, sep, post = render(marked[: i + 1], False).partition(SENTINEL.format(k))
        if not sep:
            return None
        pre = _after_prompt(head, before)
        if pre and pieces[k].endswith(pre):  # text the generation prompt leaves to the answer (Mistral's space)
            start -= len(pre)
        end += _end_of_turn(post, pieces[k + 1])  # the end-of-turn, as far as this conversation has it
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans
