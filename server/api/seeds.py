"""Seeds as clients of the hosted API send them, reduced into the generator's range.

The hosted API's ComfyUI node sends ``seed % 9999999999`` of a GUI seed drawn up to 2**50; other
clients send what their users type. Every integer ``>= 0`` is accepted and reduced modulo
``SEED_SPACE``: the integers a JSON number carries exactly in every client (JavaScript's safe
integers), all of them valid ``torch.Generator.manual_seed`` arguments. Below ``SEED_SPACE`` a seed is
used as sent, so the same seed gives the same pixels here as before; ``-1`` draws one. The seed used
is what the job records and what its result reports (``data.seed``).
"""

from __future__ import annotations

import random

SEED_SPACE = 2**53
RANDOM = -1
# Drawn seeds stay below 2**31: any client, and any other tool it is copied into, takes them.
DRAWN_BELOW = 2**31


def resolve(seed: int) -> int:
    """The seed a job runs with: ``seed`` reduced into ``[0, SEED_SPACE)``, or a fresh one for -1."""
    if seed == RANDOM:
        return draw()
    if seed < 0:
        raise ValueError(f"seed must be -1 (random) or a non-negative integer, got {seed}")
    return seed % SEED_SPACE


def draw(headroom: int = 0) -> int:
    """A random seed, with ``headroom`` consecutive seeds after it still below ``DRAWN_BELOW``."""
    return random.SystemRandom().randrange(0, DRAWN_BELOW - headroom)
