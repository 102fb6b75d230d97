"""Switch fabrics built from radix-k switches: endpoints, switches, switch-to-switch links and cost
of the topologies "Insights into DeepSeek-V3" (arXiv 2505.09343) compares in its Table 3. Pure
arithmetic.

    fabrics(net)                  # FT2, MPFT, FT3, SF, DF at net.switch_radix, priced if set
    fat_tree_2(64).endpoints      # 2,048

Standard closed forms, with radix-k switches
--------------------------------------------
    FT2   two-layer fat-tree:  k leaves + k/2 spines; k^2/2 endpoints; k^2/2 leaf-spine links
    MPFT  multi-plane FT2:     planes x FT2 (each GPU's NIC in the plane of its index in the node)
    FT3   three-layer fat-tree: 5k^2/4 switches; k^3/4 endpoints; k^3/2 switch-switch links
    SF    Slim Fly (MMS graph, q = 4w + delta a prime power): 2q^2 routers of network radix
          k' = (3q - delta)/2 and ceil(k'/2) endpoints each; q^2 k' links
    DF    canonical Dragonfly: groups of a = 2h routers, p = h endpoints and h global links per
          router, radix p + a - 1 + h; g groups (at most a h + 1); g a (a-1)/2 + g a h/2 links
"Links" count switch-to-switch cables, as the paper's table does (endpoint cables are one per
endpoint in every topology). Costs need unit prices, which the paper does not state: set
`switch_usd` and `link_usd` to get them (cost = switches x switch_usd + links x link_usd).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeforge.platform.config.builder import ConfigError

if TYPE_CHECKING:  # network_config imports this module to validate Slim Fly and Dragonfly shapes
    from moeforge.platform.plan.network_config import NetworkConfig


@dataclass(frozen=True)
class Fabric:
    """Endpoints, switches and switch-to-switch links of one topology built from radix-k switches."""

    name: str  # FT2, MPFT, FT3, SF, DF
    description: str
    endpoints: int
    switches: int
    links: int
    cost_usd: float | None = None

    @property
    def cost_per_endpoint_usd(self) -> float | None:
        return None if self.cost_usd is None else self.cost_usd / self.endpoints

    def priced(self, switch_usd: float | None, link_usd: float | None) -> Fabric:
        if switch_usd is None or link_usd is None:
            return self
        return dataclasses.replace(self, cost_usd=self.switches * switch_usd + self.links * link_usd)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cost_per_endpoint_usd"] = self.cost_per_endpoint_usd
        return out


def _even_radix(k: int) -> None:
    if k < 4 or k % 2:
        raise ConfigError(f"switch radix must be an even number >= 4, got {k}")


def fat_tree_2(k: int) -> Fabric:
    """Two-layer non-blocking fat-tree: k leaves (k/2 ports down, k/2 up) and k/2 spines."""
    _even_radix(k)
    return Fabric("FT2", f"two-layer fat-tree, k={k}", k * k // 2, k + k // 2, k * k // 2)


def multi_plane_fat_tree_2(k: int, planes: int) -> Fabric:
    """`planes` independent two-layer fat-trees; endpoint i of a node joins plane i (the paper's MPFT)."""
    if planes < 1:
        raise ConfigError(f"planes must be >= 1, got {planes}")
    one = fat_tree_2(k)
    return Fabric(
        "MPFT",
        f"{planes}-plane two-layer fat-tree, k={k}",
        planes * one.endpoints,
        planes * one.switches,
        planes * one.links,
    )


def fat_tree_3(k: int) -> Fabric:
    """Three-layer fat-tree (k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores)."""
    _even_radix(k)
    return Fabric("FT3", f"three-layer fat-tree, k={k}", k**3 // 4, 5 * k * k // 4, k**3 // 2)


def _is_prime_power(n: int) -> bool:
    if n < 2:
        return False
    p = next(d for d in range(2, n + 1) if n % d == 0)  # the smallest prime factor
    while n % p == 0:
        n //= p
    return n == 1


def slim_fly_shape(q: int) -> tuple[int, int, int]:
    """(delta, network radix k', endpoints per router p) of the MMS Slim Fly with parameter q."""
    delta = min((-1, 0, 1), key=lambda d: (q - d) % 4 != 0)
    if (q - delta) % 4:
        raise ConfigError(f"slim_fly_q must be 4w + delta with delta in {{-1, 0, 1}}, got {q}")
    k_net = (3 * q - delta) // 2
    return delta, k_net, math.ceil(k_net / 2)


def slim_fly(k: int, q: int | None = None) -> Fabric:
    """Slim Fly (diameter 2) on the MMS graph of parameter q; by default the largest prime power q
    whose router needs k' + ceil(k'/2) <= k ports."""
    if q is None:
        fits = [
            c for c in range(2, k) if c % 4 != 2 and _is_prime_power(c) and sum(slim_fly_shape(c)[1:]) <= k
        ]
        if not fits:
            raise ConfigError(f"switch radix {k} is too small for a Slim Fly")
        q = max(fits)
    _, k_net, p = slim_fly_shape(q)
    if k_net + p > k:
        raise ConfigError(f"slim_fly_q={q} needs {k_net + p} ports per router, over the radix {k}")
    routers = 2 * q * q
    return Fabric("SF", f"Slim Fly, q={q}, k'={k_net}, p={p}", routers * p, routers, routers * k_net // 2)


def dragonfly_h(k: int) -> int:
    """Global links per router h of the balanced Dragonfly (a = 2p = 2h) whose radix 4h - 1 fits k."""
    return (k + 1) // 4


def dragonfly(k: int, groups: int | None = None) -> Fabric:
    """Canonical balanced Dragonfly: a = 2h routers per group, p = h endpoints and h global links per
    router, all-to-all within a group; `groups` defaults to the maximum a h + 1."""
    h = dragonfly_h(k)
    a, p = 2 * h, h
    g = a * h + 1 if groups is None else groups
    if not 2 <= g <= a * h + 1:
        raise ConfigError(f"dragonfly groups must lie in [2, {a * h + 1}], got {g}")
    links = g * a * (a - 1) // 2 + g * a * h // 2
    return Fabric("DF", f"Dragonfly, a={a}, p={p}, h={h}, g={g}", p * a * g, a * g, links)


def fabrics(net: NetworkConfig) -> list[Fabric]:
    """The paper's comparison (FT2, MPFT, FT3, SF, DF) at `net.switch_radix`, priced when the unit
    prices are set."""
    k = net.switch_radix
    rows = [
        fat_tree_2(k),
        multi_plane_fat_tree_2(k, net.planes),
        fat_tree_3(k),
        slim_fly(k, net.slim_fly_q),
        dragonfly(k, net.dragonfly_groups),
    ]
    return [row.priced(net.switch_usd, net.link_usd) for row in rows]
