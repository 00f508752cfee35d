"""What a capture block asked for against what it got: never an empty result in silence.

Every integration tells the ledger when a selected layer runs on a captured step (``entered``),
when one of its attention calls reaches attncap with the relations that call offers (``reached``),
when a call is left alone and why (``note``), and when a record is filed (``filed``). At the end of
the block ``problems()`` lists, in words, what the user asked for and did not get:
- layers that ran but whose attention never reached attncap (a processor or backend attncap does
  not intercept), or whose every call was left alone (with the reasons);
- relations named explicitly (not "auto"/"all") that no call offered, with those that were offered;
- step indices asked for that the run never reached (``saw_step`` counts every step that ran);
- a block in which captured layers ran and nothing at all was filed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class LayerLedger:
    calls: int = 0                                  # processor calls on captured steps
    reached: int = 0                                # attention calls that reached attncap
    filed: int = 0                                  # records filed
    offered: set[str] = field(default_factory=set)  # relations its calls offered
    reasons: set[str] = field(default_factory=set)  # why calls were left alone


@dataclass
class Ledger:
    layers: dict[str, LayerLedger] = field(default_factory=lambda: defaultdict(LayerLedger))
    steps_seen: set[int] = field(default_factory=set)

    def saw_step(self, step: int) -> None:
        """A denoiser (or model) call of step ``step`` ran, captured or not."""
        self.steps_seen.add(step)

    def entered(self, layer: str) -> None:
        self.layers[layer].calls += 1

    def reached(self, layer: str, relations: list[str]) -> None:
        entry = self.layers[layer]
        entry.reached += 1
        entry.offered.update(relations)

    def note(self, layer: str, reason: str) -> None:
        self.layers[layer].reasons.add(reason)

    def filed(self, layer: str) -> None:
        self.layers[layer].filed += 1

    def problems(self, relations, steps) -> list[str]:
        """Plain-language problems; ``relations`` and ``steps`` as in CaptureConfig."""
        out = []
        ran = {name: e for name, e in self.layers.items() if e.calls}
        unreached = sorted(n for n, e in ran.items() if not e.reached and not e.reasons)
        if unreached:
            out.append(f"{len(unreached)} selected layer(s) ran but none of their attention calls reached attncap "
                       f"(the processor computes attention in a way attncap does not intercept): {_few(unreached)}")
        left = defaultdict(list)
        for name, e in ran.items():
            if not e.filed and e.reasons:
                left["; ".join(sorted(e.reasons))].append(name)
        for why, names in sorted(left.items()):
            out.append(f"{len(names)} selected layer(s) ran but no call was captured ({why}): {_few(sorted(names))}")
        offered = set().union(*(e.offered for e in ran.values())) if ran else set()
        chosen = (relations,) if isinstance(relations, str) else tuple(relations)
        missing = [r for r in chosen if r not in ("auto", "all") and r not in offered]
        if missing and ran:
            out.append(f"relations {missing} matched no attention call; the calls offered: {sorted(offered) or 'none'}")
        if not isinstance(steps, str):
            never = sorted(set(steps) - self.steps_seen)
            if never and self.steps_seen:
                out.append(f"steps {never} never ran; the steps that ran: {_few([str(s) for s in sorted(self.steps_seen)], 12)}")
        if ran and not any(e.filed for e in ran.values()) and not out:
            out.append(f"the selected layers ran but offered none of relations={relations!r}; the calls offered: "
                       f"{sorted(offered) or 'none'}")
        return out


def _few(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
