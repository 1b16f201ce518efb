"""Budgets per API key: how much the requests sending one key may spend per period, in cost and in tokens.

A request's key is its ``Authorization: Bearer`` token, else its ``x-api-key`` (as the server's own key check
reads them). It is matched against each budget's key by SHA-256 digest, compared in constant time; a key in no
budget (or no key) falls to the ``other_keys`` budget when there is one, else it is not limited.

Before a request is answered its budget is checked: once the spend of the current period has reached
``max_cost`` or ``max_tokens``, the answer is HTTP 429 with code ``insufficient_quota`` naming the budget (never
the key) and a ``Retry-After`` of the seconds until the period ends. Each answer's tokens (prompt + completion)
and cost (the answering upstream's prices; local models cost 0) are charged when it is complete, a stream at
its end, so the one request that crosses a limit is answered whole. Periods are UTC calendar hours, days or
months. The spend is kept in memory, per server process: a restart (or another replica) starts from 0.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import APIError
from .config import BudgetConfig

QUOTA_CODE = "insufficient_quota"        # OpenAI's code (and type) for a spent quota


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """(start, end) in epoch seconds of the UTC ``period`` ("hour", "day", "month") holding ``now``."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    if period == "hour":
        start = moment.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"period must be 'hour', 'day' or 'month', got {period!r}")
    return start.timestamp(), end.timestamp()


class BudgetSpent(APIError):
    """429 insufficient_quota: the budget's spend reached a limit; ``retry_after``: seconds to the next period."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(429, message, code=QUOTA_CODE, error_type=QUOTA_CODE)
        self.retry_after = retry_after


@dataclass
class _Spend:
    period_start: float
    period_end: float
    cost: float = 0.0
    tokens: int = 0


class Budgets:
    """The budgets of a config and what each has spent in its current period (thread-safe)."""

    def __init__(self, budgets: dict[str, BudgetConfig], clock=time.time):
        self.budgets = budgets
        self.clock = clock
        self._keyed = [budget for budget in budgets.values() if budget.key_digest is not None]
        self._others = next((budget for budget in budgets.values() if budget.other_keys), None)
        self._spend: dict[str, _Spend] = {}
        self._refused: dict[str, int] = {name: 0 for name in budgets}     # since the server started
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def match(self, key: str | None) -> BudgetConfig | None:
        """The budget of requests sending ``key`` (None: no key): its own, else the other keys' one, else None.
        Every keyed budget is compared (in constant time), so the time taken does not tell which matched."""
        found = None
        if key:
            digest = hashlib.sha256(key.encode("utf-8")).digest()
            for budget in self._keyed:
                if hmac.compare_digest(digest, budget.key_digest) and found is None:
                    found = budget
        return found or self._others

    def check(self, budget: BudgetConfig) -> None:
        """A :class:`BudgetSpent` when ``budget`` has reached one of its limits in the current period."""
        with self._lock:
            spend = self._current(budget)
            over = []
            if budget.max_cost is not None and spend.cost >= budget.max_cost:
                over.append(f"{spend.cost:.6f} of {budget.max_cost:g} in cost")
            if budget.max_tokens is not None and spend.tokens >= budget.max_tokens:
                over.append(f"{spend.tokens} of {budget.max_tokens} tokens")
            if not over:
                return
            self._refused[budget.name] += 1
            resets = datetime.fromtimestamp(spend.period_end, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            retry_after = max(1, math.ceil(spend.period_end - self.clock()))
        raise BudgetSpent(f"budget '{budget.name}' is spent for this {budget.period}: {' and '.join(over)} "
                          f"(it starts again at {resets})", retry_after)

    def charge(self, budget: BudgetConfig, tokens: int, cost: float) -> None:
        """Add one answer's tokens and cost to ``budget``'s current period."""
        with self._lock:
            spend = self._current(budget)
            spend.tokens += tokens
            spend.cost += cost

    def snapshot(self) -> list[dict]:
        """Per budget (in the config's order): name, period, tokens and cost spent in the current period, the
        limits, and the requests refused since the server started."""
        with self._lock:
            rows = []
            for budget in self.budgets.values():
                spend = self._current(budget)
                rows.append({"budget": budget.name, "period": budget.period, "tokens": spend.tokens,
                             "cost": spend.cost, "max_tokens": budget.max_tokens, "max_cost": budget.max_cost,
                             "refused": self._refused[budget.name]})
            return rows

    def metrics_text(self) -> str:
        """The budgets in Prometheus' text format (empty without budgets), for ``/metrics``."""
        rows = self.snapshot()
        if not rows:
            return ""
        families = [("localllm_gateway_budget_spent_tokens", "gauge", "tokens spent in the budget's current period",
                     "tokens"),
                    ("localllm_gateway_budget_spent_cost", "gauge", "cost spent in the budget's current period",
                     "cost"),
                    ("localllm_gateway_budget_max_tokens", "gauge", "the budget's token limit per period",
                     "max_tokens"),
                    ("localllm_gateway_budget_max_cost", "gauge", "the budget's cost limit per period", "max_cost"),
                    ("localllm_gateway_budget_refused_total", "counter",
                     "requests refused (429 insufficient_quota) since the server started", "refused")]
        lines = []
        for name, kind, help_text, key in families:
            samples = [(row, row[key]) for row in rows if row[key] is not None]
            if not samples:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{budget="{_escape(row["budget"])}",period="{row["period"]}"}} '
                      f'{f"{value:.6f}" if isinstance(value, float) else value}' for row, value in samples]
        return "\n".join(lines) + "\n"

    def _current(self, budget: BudgetConfig) -> _Spend:
        """``budget``'s spend in the period holding now (a new period starts from 0). Under the lock."""
        now = self.clock()
        spend = self._spend.get(budget.name)
        if spend is None or now >= spend.period_end or now < spend.period_start:
            spend = self._spend[budget.name] = _Spend(*period_bounds(budget.period, now))
        return spend


def _escape(label: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
