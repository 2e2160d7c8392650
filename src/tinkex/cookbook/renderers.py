"""Renderers: chat templates turned into tokens, loss weights, stop sequences and parsed replies.

A renderer owns one chat format. It does four things:

    build_generation_prompt(messages)          -> tokens the model continues from
    build_supervised_example(messages, what)   -> (tokens, weights): weight 1 on the tokens to learn
    get_stop_sequences()                       -> token ids (or strings) that end an assistant turn
    parse_response(sampled_tokens)             -> (assistant message, whether the turn ended properly)

Renderers work on plain token lists, so they are independent of the SDK in use (tinkex or the
official `tinker`); the loops wrap them in that SDK's `ModelInput`.

Every renderer keeps the *prefix property*: the generation prompt for `messages` is exactly the
start of the supervised example for `messages + [assistant reply]`, so what the model learns is
what it later continues from.

Formats:

    role_colon               User: hi\\n\\nAssistant: hello\\n\\n          (any tokenizer; stop string)
    llama3                   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nhi<|eot_id|>...
    chatml                   <|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n...
    qwen3                    ChatML whose last assistant turns carry <think>...</think>
    qwen3_disable_thinking   ChatML whose assistant turns start with an empty think block
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant" (others are rendered as given)
    content: str
    thinking: NotRequired[str]  # the reasoning of an assistant turn (qwen3)


class TrainOnWhat(str, enum.Enum):
    """Which tokens of a conversation get loss weight 1."""

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    ALL_MESSAGES = "all_messages"  # every message's body (headers excluded)
    ALL_TOKENS = "all_tokens"


class RendererError(ValueError):
    pass


@dataclass
class _Piece:
    tokens: list[int]
    weight: float


class Renderer:
    """Base class. Subclasses describe a format by how each message becomes (header, body, tail)."""

    name = "base"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    # ---- tokenization helpers -----------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Tokens of user-controlled text: special-token strings inside it stay ordinary text."""
        if not text:
            return []
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        except TypeError:  # tokenizers that do not know the flag
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_markup(self, text: str) -> list[int]:
        """Tokens of template markup: special tokens such as <|im_start|> map to their single id."""
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def single_token(self, text: str) -> int | None:
        """The id of `text` when the tokenizer has it as one token, else None."""
        ids = self.encode_markup(text)
        return ids[0] if len(ids) == 1 else None

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- the four operations ------------------------------------------------------------------

    def build_generation_prompt(self, messages: Sequence[Message], role: str = "assistant",
                                prefill: str | None = None) -> list[int]:
        """Tokens of `messages` followed by the header of a new `role` turn (and `prefill` text)."""
        tokens = list(self._prefix())
        for i, message in enumerate(messages):
            header, body, tail = self._render(messages, i)
            tokens += header + body + tail
        tokens += self._header(role, is_generation=True, messages=messages)
        if prefill:
            tokens += self.encode_text(prefill)
        return tokens

    def build_supervised_example(self, messages: Sequence[Message],
                                 train_on_what: TrainOnWhat | str = TrainOnWhat.ALL_ASSISTANT_MESSAGES
                                 ) -> tuple[list[int], list[float]]:
        """All tokens of the conversation and a weight per token (1 where the model should learn)."""
        what = TrainOnWhat(train_on_what)
        assistant_positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last_assistant = assistant_positions[-1] if assistant_positions else -1
        pieces = [_Piece(list(self._prefix()), 1.0 if what is TrainOnWhat.ALL_TOKENS else 0.0)]
        for i, message in enumerate(messages):
            header, body, tail = self._render(messages, i)
            if what is TrainOnWhat.ALL_TOKENS:
                learn_body = True
            elif what is TrainOnWhat.ALL_MESSAGES:
                learn_body = True
            elif what is TrainOnWhat.ALL_ASSISTANT_MESSAGES:
                learn_body = message["role"] == "assistant"
            else:
                learn_body = i == last_assistant
            all_tokens = what is TrainOnWhat.ALL_TOKENS
            pieces.append(_Piece(header, 1.0 if all_tokens else 0.0))
            pieces.append(_Piece(body, 1.0 if learn_body else 0.0))
            pieces.append(_Piece(tail, 1.0 if all_tokens else 0.0))
        tokens = [t for p in pieces for t in p.tokens]
        weights = [p.weight for p in pieces for _ in p.tokens]
        return tokens, weights

    def get_stop_sequences(self) -> list[int] | list[str]:
        raise NotImplementedError

    def parse_response(self, tokens: Sequence[int]) -> tuple[Message, bool]:
        """The assistant message in sampled `tokens`, and True when the turn ended with a stop sequence."""
        stops = self.get_stop_sequences()
        tokens = list(tokens)
        ended = False
        if stops and isinstance(stops[0], int):
            for k, token in enumerate(tokens):
                if token in stops:
                    tokens, ended = tokens[:k], True
                    break
            text = self.decode(tokens)
        else:
            text = self.decode(tokens)
            cut = [text.find(s) for s in stops if s in text]
            if cut:
                text, ended = text[:min(cut)], True
        return self._message_from_text(text), ended

    # ---- what subclasses define -------------------------------------------------------------

    def _prefix(self) -> list[int]:
        return []

    def _header(self, role: str, *, is_generation: bool = False, messages: Sequence[Message] = ()) -> list[int]:
        raise NotImplementedError

    def _render(self, messages: Sequence[Message], i: int) -> tuple[list[int], list[int], list[int]]:
        """(header, body, tail) of message i. The body of an assistant turn includes the stop marker."""
        raise NotImplementedError

    def _message_from_text(self, text: str) -> Message:
        return Message(role="assistant", content=text)


class RoleColonRenderer(Renderer):
    """`User: ...` / `Assistant: ...` turns separated by blank lines. Works with any tokenizer.

    An assistant turn ends when the model writes the next `User:`; that marker is part of what it
    learns, and the stop sequence is the string "\\n\\nUser:".
    """

    name = "role_colon"
    STOP = "\n\nUser:"

    def _header(self, role, *, is_generation=False, messages=()):
        return self.encode_markup(f"{role.capitalize()}:")

    def _render(self, messages, i):
        message = messages[i]
        header = self._header(message["role"])
        if message["role"] == "assistant":
            # " reply" + "\n\nUser:" so the model learns to hand the turn back; when a user turn
            # follows, its header is these same tokens, so it gets an empty header.
            body = self.encode_text(" " + message["content"]) + self.encode_markup(self.STOP)
            return header, body, []
        if i > 0 and message["role"] == "user" and messages[i - 1]["role"] == "assistant":
            return [], self.encode_text(" " + message["content"]) + self.encode_markup("\n\n"), []
        return header, self.encode_text(" " + message["content"]) + self.encode_markup("\n\n"), []

    def get_stop_sequences(self):
        return [self.STOP]

    def _message_from_text(self, text):
        return Message(role="assistant", content=text.strip())


class Llama3Renderer(Renderer):
    """Llama 3 instruct. Header tags are single tokens when the tokenizer has them; otherwise they
    are spelled out as text and the stop sequence becomes the string "<|eot_id|>"."""

    name = "llama3"
    BOS, START, END, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.eot_id = self.single_token(self.EOT)

    def _prefix(self):
        return self.encode_markup(self.BOS)

    def _header(self, role, *, is_generation=False, messages=()):
        return self.encode_markup(self.START) + self.encode_text(role) + self.encode_markup(self.END + "\n\n")

    def _render(self, messages, i):
        message = messages[i]
        return self._header(message["role"]), self.encode_text(message["content"]) + self.encode_markup(self.EOT), []

    def get_stop_sequences(self):
        return [self.eot_id] if self.eot_id is not None else [self.EOT]


class ChatMLRenderer(Renderer):
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`. Stops at the <|im_end|> token."""

    name = "chatml"
    START, END = "<|im_start|>", "<|im_end|>"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.end_id = self.single_token(self.END)
        if self.end_id is None or self.single_token(self.START) is None:
            raise RendererError(f"renderer {self.name!r} needs {self.START} and {self.END} as single tokens")

    def _header(self, role, *, is_generation=False, messages=()):
        return self.encode_markup(self.START) + self.encode_text(role) + self.encode_markup("\n")

    def _assistant_body(self, messages, i) -> list[int]:
        return self.encode_text(messages[i]["content"])

    def _render(self, messages, i):
        message = messages[i]
        body = self._assistant_body(messages, i) if message["role"] == "assistant" else self.encode_text(message["content"])
        # "\n" after <|im_end|> is never generated (sampling stops at <|im_end|>), so it is not learned.
        return self._header(message["role"]), body + [self.end_id], self.encode_markup("\n")

    def get_stop_sequences(self):
        return [self.end_id]


class Qwen3Renderer(ChatMLRenderer):
    """Qwen 3 with thinking: assistant turns after the last user message carry a
    `<think>\\n...\\n</think>\\n\\n` block before the answer (empty when the message has no
    `thinking`); earlier assistant turns keep only their answer, as Qwen 3's template does.
    The model writes its own think block, so the generation prompt ends at `<|im_start|>assistant\\n`.
    `parse_response` splits the reply into `thinking` and `content`."""

    name = "qwen3"
    THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

    def _think_block(self, thinking: str) -> list[int]:
        inner = self.encode_text(thinking.strip()) if thinking.strip() else []
        return (self.encode_markup(self.THINK_OPEN + "\n") + inner
                + self.encode_markup("\n" + self.THINK_CLOSE + "\n\n"))

    def _assistant_body(self, messages, i):
        message = messages[i]
        last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if i > last_user:
            return self._think_block(message.get("thinking", "")) + self.encode_text(message["content"])
        return self.encode_text(message["content"])

    def _message_from_text(self, text):
        match = re.match(r"\s*<think>(.*?)</think>\s*(.*)\Z", text, flags=re.S)
        if match:
            message = Message(role="assistant", content=match.group(2).strip())
            if match.group(1).strip():
                message["thinking"] = match.group(1).strip()
            return message
        if "<think>" in text and "</think>" not in text:  # cut off while thinking
            return Message(role="assistant", content="", thinking=text.split("<think>", 1)[1].strip())
        return Message(role="assistant", content=text.strip())


class Qwen3DisableThinkingRenderer(Qwen3Renderer):
    """Qwen 3 with thinking switched off: every assistant turn starts with an empty think block,
    and that block belongs to the turn's header, so the generation prompt already contains it and
    the model only writes the answer."""

    name = "qwen3_disable_thinking"

    def _header(self, role, *, is_generation=False, messages=()):
        header = super()._header(role)
        if role == "assistant":
            header += self._think_block("")
        return header

    def _assistant_body(self, messages, i):
        return self.encode_text(messages[i]["content"])


RENDERERS: dict[str, Callable[[Any], Renderer]] = {
    "role_colon": RoleColonRenderer,
    "llama3": Llama3Renderer,
    "chatml": ChatMLRenderer,
    "qwen3": Qwen3Renderer,
    "qwen3_disable_thinking": Qwen3DisableThinkingRenderer,
}


def register_renderer(name: str, factory: Callable[[Any], Renderer]) -> None:
    RENDERERS[name] = factory


def get_renderer(name: str, tokenizer: Any) -> Renderer:
    try:
        factory = RENDERERS[name]
    except KeyError:
        raise RendererError(f"unknown renderer {name!r} (known: {', '.join(RENDERERS)})") from None
    return factory(tokenizer)


def recommended_renderer(model_name: str) -> str:
    """A sensible renderer for a model name: ChatML for the built-in model, Qwen 3 / Llama 3
    formats for those families, role_colon for anything else (including base models)."""
    lowered = model_name.lower()
    if lowered.startswith("tinkex/"):
        return "chatml"
    if "base" in lowered.rsplit("/", 1)[-1]:
        return "role_colon"
    if "qwen3" in lowered:
        return "qwen3"
    if "llama-3" in lowered or "llama3" in lowered:
        return "llama3"
    return "role_colon"
