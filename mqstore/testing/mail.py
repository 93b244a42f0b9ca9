"""Seeded, realistic email-like messages for tests and benchmarks.

A message has the headers a real MTA hop produces (Received chain, DKIM-Signature with base64,
Message-ID, MIME headers) and a text body of words drawn with a Zipf-like frequency, so zstd sees
what it sees on real mail: repetitive headers, natural-language text, some incompressible base64.
"""

from __future__ import annotations

import base64
import random

_SYLLABLES = [
    "ka",
    "ro",
    "mi",
    "ta",
    "ne",
    "su",
    "lo",
    "vi",
    "da",
    "pe",
    "an",
    "or",
    "en",
    "ti",
    "co",
    "ma",
    "re",
    "la",
    "se",
    "in",
    "de",
    "ha",
    "us",
    "it",
    "po",
    "fa",
    "ul",
    "gi",
    "be",
    "to",
    "ter",
    "son",
    "ing",
    "ment",
    "tion",
    "pro",
    "con",
    "com",
    "ver",
    "der",
    "ber",
    "ger",
    "ten",
    "ran",
    "ler",
    "sta",
    "pri",
]
_DOMAINS = ("example.org", "example.net", "example.com", "mail.example.org", "lists.example.net")
_CITIES = ("Amsterdam", "Berlin", "Lisbon", "Oslo", "Vienna", "Zurich", "Dublin", "Madrid")


def _vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class MailFactory:
    """Makes messages of roughly ``size`` bytes; the same seed gives the same messages."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.words = _vocabulary(self.rng)
        # Zipf-like weights: word k appears with frequency ~ 1/(k+1).
        self.weights = [1.0 / (k + 1) for k in range(len(self.words))]
        self.counter = 0

    def address(self) -> str:
        rng = self.rng
        return f"{rng.choice(self.words)}.{rng.choice(self.words)}@{rng.choice(_DOMAINS)}"

    def message(self, size: int = 2048, recipients: list[str] | None = None, sender: str | None = None) -> bytes:
        rng = self.rng
        self.counter += 1
        sender = sender or self.address()
        rcpts = recipients or [self.address()]
        subject = " ".join(rng.choices(self.words, self.weights, k=rng.randint(3, 8))).capitalize()
        msgid = f"<{rng.getrandbits(64):016x}.{self.counter}@{sender.split('@')[1]}>"
        dkim = base64.b64encode(rng.randbytes(128)).decode()
        headers = [
            f"Received: from mx{rng.randint(1, 9)}.{rng.choice(_DOMAINS)} "
            f"(mx.{rng.choice(_DOMAINS)} [192.0.2.{rng.randint(1, 254)}])\r\n"
            f"\tby smtp.example.org with ESMTPS id {rng.getrandbits(40):010x}\r\n"
            f"\tfor <{rcpts[0]}>; Tue, 3 Nov 2026 10:{rng.randint(10, 59)}:{rng.randint(10, 59)} +0000",
            f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={sender.split('@')[1]}; s=s1;\r\n"
            f"\th=from:to:subject:date:message-id; bh={dkim[:44]};\r\n\tb={dkim[44:]}",
            f"From: {sender.split('@')[0].title()} <{sender}>",
            f"To: {', '.join(rcpts)}",
            f"Subject: {subject}",
            f"Date: Tue, 3 Nov 2026 10:{rng.randint(10, 59)}:{rng.randint(10, 59)} +0000",
            f"Message-ID: {msgid}",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        head = ("\r\n".join(headers) + "\r\n\r\n").encode()
        lines = [f"Hello {rcpts[0].split('@')[0].split('.')[0].title()},", ""]
        body_len = 0
        target = max(0, size - len(head) - 110)
        while body_len < target:
            words = rng.choices(self.words, self.weights, k=rng.randint(6, 14))
            line = " ".join(words).capitalize() + "."
            if rng.random() < 0.05:
                line = f"Our office in {rng.choice(_CITIES)} will answer within {rng.randint(1, 9)} days."
            lines.append(line)
            body_len += len(line) + 2
            if rng.random() < 0.15:
                lines.append("")
        lines += ["", "Kind regards,", sender.split("@")[0].title(), "--", f"https://{rng.choice(_DOMAINS)}/"]
        raw = head + "\r\n".join(lines).encode() + b"\r\n"
        return raw[:size] if len(raw) > size else raw


__all__ = ["MailFactory"]
