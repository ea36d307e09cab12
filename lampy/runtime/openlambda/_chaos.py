"""Seeded fault plans for `lampy worker --chaos`: which call suffers which fault.

A plan is a comma-separated list of `fault=probability`, e.g.
`kill=0.05,502=0.05,429=0.05,hang=0.02,reset=0.02,corrupt=0.01,duplicate=0.02`: each call to
`/run/...` suffers at most one fault, drawn in arrival order from a generator seeded with
`--chaos-seed`, so one seed gives the same sequence of faults (which call gets which depends on
the order calls arrive in). The worker counts what it did as `chaos_<fault>` in `GET /stats`,
so a test can check the client saw every fault it was dealt.

>>> plan = FaultPlan.parse("kill=0.05, 429=0.1", seed=7)
>>> plan
FaultPlan('kill=0.05,429=0.1', seed=7)
>>> round(plan.total, 2)
0.15
>>> draws = plan.dealer()
>>> sorted({draws.draw() or "none" for _ in range(1000)})
['429', 'kill', 'none']
>>> FaultPlan.parse("kill=0.5,boom=0.1")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lampy._errors.OptionError: --chaos: unknown fault 'boom'; faults: kill, 502, 429, hang, reset, ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lampy._errors import OptionError

#: Every fault the worker can inject, and what it does to the call.
FAULTS = {
    "kill": "SIGKILL the sandbox while it runs the call; the worker answers 502 RoundTrip failed",
    "502": "answer 502 RoundTrip failed without running the call",
    "429": "answer 429 lambda function queue is full without running the call",
    "hang": "the call hangs past the runtime limit; 502 then, and the sandbox is destroyed",
    "reset": "run the call, then reset the connection instead of answering",
    "corrupt": "run the call, then flip bytes in the answer's body",
    "duplicate": "run the call, then answer with an earlier call's answer (a late duplicate)",
    "lose": "never run nor answer the call, until the caller hangs up (OpenLambda drops a call "
    "queued behind a failed round trip)",
}


@dataclass(frozen=True)
class FaultPlan:
    """Fault probabilities per call, in the order given, and the seed that deals them."""

    rates: tuple[tuple[str, float], ...]
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> FaultPlan:
        """A plan from its `--chaos` string; refuses unknown faults and impossible rates."""
        rates: dict[str, float] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            fault, sep, rate_text = (part.strip() for part in item.partition("="))
            if not sep:
                raise OptionError(f"--chaos: {item!r} needs a probability, like {item}=0.05")
            if fault not in FAULTS:
                known = ", ".join(FAULTS)
                raise OptionError(f"--chaos: unknown fault {fault!r}; faults: {known}")
            if fault in rates:
                raise OptionError(f"--chaos: {fault!r} is given twice")
            try:
                rate = float(rate_text)
            except ValueError:
                raise OptionError(
                    f"--chaos: the probability of {fault!r} must be a number; got {rate_text!r}"
                ) from None
            if not 0.0 <= rate <= 1.0:
                raise OptionError(
                    f"--chaos: the probability of {fault!r} must be in [0, 1]; got {rate_text}"
                )
            rates[fault] = rate
        if not rates:
            raise OptionError(f"--chaos: no faults in {text!r}; e.g. 'kill=0.05,429=0.05'")
        plan = cls(tuple(rates.items()), seed)
        if plan.total > 1.0 + 1e-9:
            raise OptionError(
                f"--chaos: the probabilities add up to {plan.total:g}; a call suffers at most "
                "one fault, so they must add up to at most 1"
            )
        return plan

    @property
    def total(self) -> float:
        """The probability that a call suffers some fault."""
        return sum(rate for _, rate in self.rates)

    def __repr__(self) -> str:
        return f"FaultPlan({str(self)!r}, seed={self.seed})"

    def __str__(self) -> str:
        return ",".join(f"{fault}={rate:g}" for fault, rate in self.rates)

    def dealer(self) -> Dealer:
        """A fresh generator of this plan's faults, from its seed."""
        return Dealer(self)


class Dealer:
    """Deals one fault (or none) per call, and the random bytes a fault needs."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.random = random.Random(plan.seed)

    def draw(self) -> str | None:
        """The next call's fault, or None."""
        u = self.random.random()
        for fault, rate in self.plan.rates:
            if u < rate:
                return fault
            u -= rate
        return None

    def corrupt(self, body: bytes) -> bytes:
        """`body` with one to three bytes flipped (XOR with a non-zero byte).

        >>> dealer = FaultPlan.parse("corrupt=1").dealer()
        >>> body = bytes(100)
        >>> 1 <= sum(a != b for a, b in zip(body, dealer.corrupt(body))) <= 3
        True
        """
        damaged = bytearray(body)
        for _ in range(self.random.randint(1, 3) if damaged else 0):
            damaged[self.random.randrange(len(damaged))] ^= self.random.randint(1, 255)
        return bytes(damaged)

    def pick(self, count: int) -> int:
        """An index into `count` remembered answers, for a duplicate."""
        return self.random.randrange(count)
