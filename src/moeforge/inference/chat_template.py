"""The chat template of moeforge's tokenizers (the byte-level one and those `moeforge tokenizer` trains
have none of their own): 'role: content' lines, then 'assistant:' for the model to continue.

One function renders it for the server's chat requests and for multimodal training's examples, so a
model trained here is asked, through `/v1/chat/completions`, in the form it learnt."""

from __future__ import annotations

# OpenAI's newer name for the system role: both render as "system".
ROLE_NAMES = {"developer": "system"}


def render(turns) -> list:
    """[(role, [text or medium, ...]), ...] -> segments [text, medium, text, ...]: each turn's texts joined
    into its line, each medium (any non-str object) kept where it was, in order."""
    out: list = [""]
    for role, pieces in turns:
        out[-1] += f"{ROLE_NAMES.get(role, role)}: "
        for piece in pieces:
            if isinstance(piece, str):
                out[-1] += piece
            else:
                out += [piece, ""]
        out[-1] += "\n"
    out[-1] += "assistant:"
    return out
