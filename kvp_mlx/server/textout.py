"""The text a request streams: stop strings cut on the decoded text, and mlx-lm server's split of
reasoning and tool-call segments (shared by the one-at-a-time worker and the batching loop)."""

from __future__ import annotations


class StopText:
    """Stop strings matched on the decoded text (mlx-lm matches their token ids, which miss a stop
    string tokenized differently inside the text, and strips them from the text instead): generation
    stops where the first one occurs, the text before it kept, the stop string dropped. Text that may
    begin a stop string is held back until the next piece decides."""

    def __init__(self, words: list[str]) -> None:
        self.words, self.pending = words, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be emitted, whether a stop string ended the generation)."""
        buf = self.pending + text
        found = [i for i in (buf.find(w) for w in self.words) if i >= 0]
        if found:
            self.pending = ""
            return buf[:min(found)], True
        hold = max((k for w in self.words for k in range(1, len(w)) if buf.endswith(w[:k])), default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class ToolText:
    """mlx-lm server's split of the state machine's segments: normal text, reasoning, and tool-call
    texts, each call complete when its state goes back to normal (or the generation ends). With
    ``parse=False`` (``tool_choice: "none"``) tool-call text stays in the normal text."""

    def __init__(self, parse: bool) -> None:
        self.parse, self.state, self.pending = parse, "normal", ""

    def feed(self, segments: list[tuple[str, str]], final: bool) -> tuple[str, list[str], str]:
        """(normal text, the tool-call texts completed, reasoning text)."""
        text, calls, reasoning = [], [], []
        for state, part in segments:
            if state == "tool" and self.parse:
                self.pending += part
            elif state == "reasoning":
                reasoning.append(part)
            else:
                if self.state == "tool" and state != "tool" and self.parse:
                    calls.append(self.pending)
                    self.pending = ""
                text.append(part)
            self.state = state
        if final and self.state == "tool" and self.pending:
            calls.append(self.pending)
            self.pending = ""
        return "".join(text), calls, "".join(reasoning)
