"""Reading the gateway's SSE responses in tests: frames exactly as sent,
comments included (the product's own decoder drops comments by design)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Frame:
    raw: bytes
    at: float
    comment: str | None = None
    event: str | None = None
    id: str | None = None
    data: str | None = None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


def parse_frame(raw: bytes, at: float) -> Frame:
    frame = Frame(raw=raw, at=at)
    for line in raw.decode().split("\n"):
        if line.startswith(":"):
            frame.comment = line[1:].strip()
        elif line.startswith("event: "):
            frame.event = line[7:]
        elif line.startswith("id: "):
            frame.id = line[4:]
        elif line.startswith("data: "):
            frame.data = line[6:] if frame.data is None else frame.data + "\n" + line[6:]
    return frame


@dataclass
class FrameReader:
    """Splits a streaming body into frames as the bytes arrive."""

    response: aiohttp.ClientResponse
    buffer: bytes = b""
    frames: list[Frame] = field(default_factory=list)

    async def next(self) -> Frame | None:
        while b"\n\n" not in self.buffer:
            chunk = await self.response.content.readany()
            if not chunk:
                return None
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n\n", 1)
        frame = parse_frame(raw + b"\n\n", time.monotonic())
        self.frames.append(frame)
        return frame

    async def rest(self) -> list[Frame]:
        while await self.next() is not None:
            pass
        return self.frames


def openai_text(frames: list[Frame]) -> str:
    text = []
    for frame in frames:
        if frame.data and frame.data != "[DONE]":
            for choice in frame.json().get("choices", []):
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


def native_text(frames: list[Frame]) -> str:
    return "".join(f.json().get("text", "") for f in frames if f.event == "delta")
