"""System turns in the middle of a conversation (Anthropic's mid-conversation system entries,
OpenAI's system / developer messages after the first turn), placed so that everything before
them renders the same bytes from one turn of a conversation to the next: the prompt cache then
reuses the whole earlier conversation.

They are never hoisted into the leading system prompt (that would change the prompt's first
bytes every time one is added). Where the model's chat template renders a system turn in place,
it stays in place; where the template refuses one (it raises, as templates that insist on
user/assistant alternation do) or moves it (to the top), it is folded into the start of the next
user turn (or, at the end of the chat, appended to the last user turn, or made one). Which of
the two a template does is found once per model, by rendering a probe conversation.
"""

from __future__ import annotations

import weakref

import attrs

from ..errors import InvalidRequest
from ..messages import ChatMessage, PromptSpec
from .port import ModelPort

SEPARATOR = "\n\n"
_MARK = "mid-conversation system probe 7f3a"
_PROBE = (
    ChatMessage(role="system", content="You are helpful."),
    ChatMessage(role="user", content="first question"),
    ChatMessage(role="assistant", content="first answer"),
    ChatMessage(role="system", content=_MARK),
    ChatMessage(role="user", content="second question"),
)

_in_place: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def has_mid_system(chat: tuple[ChatMessage, ...]) -> bool:
    return any(m.role == "system" for m in chat[1:])


async def arrange(model: ModelPort, chat: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """`chat` with its later system turns where the model's template can take them."""
    if not has_mid_system(chat):
        return chat
    if await renders_in_place(model):
        return chat
    return fold(chat)


async def renders_in_place(model: ModelPort) -> bool:
    """Whether the template renders a system turn after the first where it stands."""
    known = _in_place.get(model)
    if known is None:
        try:
            ids = await model.prompt_ids(PromptSpec(chat=_PROBE))
            text, _ = await model.detokenize(ids)
        except InvalidRequest:
            known = False
        else:
            at = text.find(_MARK)
            known = at > text.find("first answer") >= 0 and at < text.find("second question")
        _in_place[model] = known
    return known


def fold(chat: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """Every system turn after the first folded into the start of the next user turn; where an
    assistant turn (or the end) comes first, appended to the user turn before it, or made a
    user turn of its own. The same conversation folds the same way however it goes on."""
    out: list[ChatMessage] = []
    pending: list[str] = []

    def flush() -> None:
        last = out[-1] if out else None
        if last is not None and last.role == "user":
            content = SEPARATOR.join([last.content or "", *pending])
            out[-1] = attrs.evolve(last, content=content)  # images keep their offsets
        else:
            out.append(ChatMessage(role="user", content=SEPARATOR.join(pending)))
        pending.clear()

    for i, turn in enumerate(chat):
        if turn.role == "system" and i > 0:
            if turn.content:
                pending.append(turn.content)
            continue
        if pending and turn.role == "user":
            head = SEPARATOR.join(pending) + SEPARATOR
            images = tuple(attrs.evolve(r, offset=r.offset + len(head)) for r in turn.images)
            turn = attrs.evolve(turn, content=head + (turn.content or ""), images=images)
            pending.clear()
        elif pending and turn.role == "assistant":
            flush()
        out.append(turn)
    if pending:
        flush()
    return tuple(out)
