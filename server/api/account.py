"""Account figures, honest on-prem: what a prediction costs (``QWEN_EDIT_PRICES``; default nothing),
what a key may spend (``QWEN_EDIT_BUDGETS``; default no cap), and what it has spent: its completed
predictions, counted from the job rows, at today's prices. No other source, no invented numbers.
A budget is enforced by the store, in the transaction that admits a submit (server/jobs/store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.auth import Caller, key_id
from server.errors import PaymentRequired
from server.jobs.contract import Status
from server.jobs.history import Scope
from server.jobs.store import Budget, JobStore, OverBudget, Prices
from server.settings import Settings

CURRENCY = "USD"


@dataclass(frozen=True)
class Balance:
    budget: float | None  # None: no cap for this key
    spent: float

    @property
    def left(self) -> float | None:
        return None if self.budget is None else round(self.budget - self.spent, 6)


class Account:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.store = store
        self.prices = Prices(dict(settings.prices))
        # Budgets may name a key or its id (the digest logs and job rows carry): index both by id.
        self.budgets: dict[str, float] = {}
        for name, amount in settings.budgets.items():
            self.budgets[name if name == "*" or _is_key_id(name) else key_id(name)] = amount

    def price(self, model: str) -> float:
        return self.prices.price(model)

    @property
    def charges(self) -> bool:
        return any(self.prices.by_model.values())

    def scope(self, who: Caller) -> Scope:
        """What a caller's account covers: its key's predictions (all of them with auth off)."""
        return Scope(key_id=who.key_id, all_keys=who.key_id is None)

    def budget(self, who: Caller) -> float | None:
        if who.key_id is None:
            return None
        return self.budgets.get(who.key_id, self.budgets.get("*"))

    def spent(self, who: Caller) -> float:
        """The cost of the caller's completed predictions (failed ones cost nothing)."""
        if not self.charges:
            return 0.0
        counts = self.store.history.count_by_model(self.scope(who), (Status.COMPLETED,))
        return round(sum(self.price(model) * n for model, n in counts.items()), 6)

    def balance(self, who: Caller) -> Balance:
        return Balance(budget=self.budget(who), spent=self.spent(who))

    def admission_budget(self, who: Caller) -> Budget | None:
        """The budget the store checks atomically with a submit's insert (None: no cap)."""
        cap = self.budget(who)
        return None if cap is None else Budget(cap=cap, prices=self.prices)


def over_budget(refusal: OverBudget) -> PaymentRequired:
    return PaymentRequired(f"This API key's budget is spent ({refusal}). Ask the operator to raise QWEN_EDIT_BUDGETS.")


def _is_key_id(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)
