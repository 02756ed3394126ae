"""One engine request per choice: `n` choices of each prompt, each with its own derived seed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import trio

from ..messages import Finished, GenerationRequest, StreamEvent, Usage
from .prepare import Prepared


def choice_requests(prepared: Prepared) -> list[GenerationRequest]:
    """Choice `i` belongs to prompt `i // n`. A seeded request gives choice `j` of a prompt the
    seed `seed + j`, so choices differ yet the whole response is reproducible."""
    request, n = prepared.request, prepared.request.n
    out: list[GenerationRequest] = []
    for p, prompt in enumerate(prepared.prompts):
        for j in range(n):
            sampling = prepared.sampling
            if sampling.seed is not None and j:
                sampling = attrs.evolve(sampling, seed=sampling.seed + j)
            index = p * n + j
            out.append(
                GenerationRequest(
                    request_id=request.id if prepared.choices == 1 else f"{request.id}-{index}",
                    prompt_ids=prompt.ids,
                    sampling=sampling,
                    max_tokens=prompt.max_tokens,
                    stop=request.stop,
                    ignore_eos=request.ignore_eos,
                    constraint=prepared.constraint,
                    vision=prompt.vision,
                )
            )
    return out


async def nothing_to_generate(prepared: Prepared) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of `max_tokens: 0`: every choice ends at once, having generated nothing."""
    for i, request in enumerate(choice_requests(prepared)):
        usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=0)
        yield i, Finished(finish_reason="length", usage=usage)
    await trio.lowlevel.checkpoint()
