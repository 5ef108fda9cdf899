"""A multi-turn chat over an Engine: history, images for the next turn, and the interactive loop.

Each turn sends the whole conversation as one request, so the answer is exactly what the model gives
for that conversation (routing included: the routing span is the first user turn, docs/design.md section 1).
The engine notices that the conversation starts with what it has in its KV cache (the previous turns)
and prefills only the new tokens (Generation.cached_prompt_tokens says how many were reused).
"""
from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator

from ..errors import AwakerError
from .engine import Engine, Generation, load_image
from .report import format_routing, routing_report
from .sampling import SamplingParams

HELP = ("/image PATH  add an image to your next message · /reset  start over · /routing  experts of the last "
        "answer · /quit  leave · Ctrl-C stops an answer")


class ChatSession:
    def __init__(self, engine: Engine, *, system: str | None = None, params: SamplingParams | None = None):
        self.engine = engine
        self.system = system
        self.params = (params or SamplingParams()).validate()
        self.history: list[dict] = []
        self.pending_images: list = []  # PIL images for the next user turn
        self.last: Generation | None = None

    def add_image(self, path) -> None:
        self.pending_images.append(load_image(path))

    def reset(self) -> None:
        self.history, self.pending_images, self.last = [], [], None

    def messages(self, text: str) -> list[dict]:
        """The conversation so far plus a new user turn (with the pending images)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        parts = [{"type": "image", "image": im} for im in self.pending_images] + [{"type": "text", "text": text}]
        return system + self.history + [{"role": "user", "content": parts}]

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the turn (even a stopped, partial one) joins the history."""
        messages = self.messages(text)
        stream = self.engine.stream(messages, self.params)  # bad input fails here, before anything changes
        self.pending_images = []
        try:
            yield from stream
        finally:
            stream.close()
            self.last = stream.result
            self.history += [messages[-1], {"role": "assistant", "content": stream.result.text}]

    def routing_lines(self) -> list[str]:
        if self.last is None:
            return ["no answer yet: routing is computed when a question is asked"]
        if self.last.routing is None:
            return ["this is a dense model: there is no routing"]
        return format_routing(routing_report(self.engine.model.awaker_config, self.last.routing))


def stats_line(g: Generation) -> str:
    end = "" if g.finish_reason != "interrupted" else " · stopped"
    cached = f" ({g.cached_prompt_tokens} cached)" if g.cached_prompt_tokens else ""
    new = f"{g.new_tokens} new token{'' if g.new_tokens == 1 else 's'}"
    speed = f" · {g.tokens_per_s:.1f} tok/s" if g.new_tokens > 1 else ""  # a speed needs two tokens or more
    return (f"[{g.prompt_tokens} prompt tokens{cached} · {new} · first token "
            f"{g.time_to_first_token_s:.2f} s{speed}{end}]")


def interactive(session: ChatSession, *, read_line: Callable[[], str], write: Callable[[str], None],
                info: Callable[[str], None], show_routing: bool = False) -> None:
    """The read-answer loop. read_line raises EOFError at the end of input; answers go to `write`
    piece by piece, everything else (stats, notices, errors) to `info`."""
    info(HELP)
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            return
        except KeyboardInterrupt:
            info("(/quit leaves)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line, info):
                return
            continue
        answer = session.ask(line)
        try:
            for piece in answer:
                write(piece)
        except KeyboardInterrupt:
            pass  # stop this answer, stay in the chat
        except AwakerError as e:
            info(f"error: {e}" + (" (/reset starts a new conversation)" if "context" in str(e) else ""))
            continue
        finally:
            answer.close()  # records the (possibly partial) turn at once, wherever the interrupt landed
        write("\n")
        info(stats_line(session.last))
        if show_routing:
            for text in session.routing_lines():
                info(text)


def _command(session: ChatSession, line: str, info: Callable[[str], None]) -> bool:
    """Run a /command; True means leave."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return True
    if name == "/reset":
        session.reset()
        info("(conversation cleared)")
    elif name == "/routing":
        for text in session.routing_lines():
            info(text)
    elif name == "/image":
        if not arg:
            info("usage: /image PATH")
            return False
        try:
            path = " ".join(shlex.split(arg))  # allow quotes around paths with spaces
        except ValueError:
            path = arg
        try:
            session.add_image(path)
            info(f"(image {path} will go with your next message)")
        except AwakerError as e:
            info(f"error: {e}")
    elif name in ("/help", "/?"):
        info(HELP)
    else:
        info(f"unknown command {name}; {HELP}")
    return False
