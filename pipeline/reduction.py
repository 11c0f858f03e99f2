"""Deterministic reduction: partial sums of work units fold into the final arrays in block order.

For each fold chain (the shared pass, or one tensor's channel group), running(k) is the float64
sum of blocks 0..k-1, always formed as running(k) + partial(k), array by array, so the final
arrays are bit-identical whatever the number of workers, the order units finish, retries and
resumes. A partial is deleted once folded, so a store holds the sums of the units in flight and
one running sum per chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.plan import Plan, Unit
from pipeline.store import ResultStore, tensor_key

WeightOf = Callable[[int], np.ndarray]  # a tensor's index -> its weight values (float64), for the saliency


def sum_name(tensor: int, quantity: str) -> str:
    """The name of one tensor's array in a unit's sums."""
    return f"{tensor_key(tensor)}_{quantity}"


def running_name(chain: str, folded: int) -> str:
    return f"{chain}-k{folded:05d}"


def latest_running(store: ResultStore, chain: str) -> tuple[int, str | None]:
    """(blocks folded, name) of ``chain``'s newest complete running sum; (0, None) when there is none."""
    prefix = f"{chain}-k"
    for name in sorted((n for n in store.sums_list("running") if n.startswith(prefix)), reverse=True):
        if store.sums_valid("running", name):
            return int(name[len(prefix):]), name
    return 0, None


def chain_complete(plan: Plan, chain: str, done_shards: set[str]) -> bool:
    return all(shard.name in done_shards for shard in plan.chain_shards(chain))


@dataclass
class UnitState:
    """Which units are done (folded, or with valid partial sums) and which remain."""

    done: list[Unit]
    todo: list[Unit]


def unit_state(store: ResultStore, plan: Plan, done_shards: set[str]) -> UnitState:
    done, todo = [], []
    for chain, units in plan.chains().items():
        if chain_complete(plan, chain, done_shards):
            done += units
            continue
        folded = latest_running(store, chain)[0]
        for unit in units:
            finished = unit.block < folded or store.sums_valid("partials", unit.name)
            (done if finished else todo).append(unit)
    return UnitState(done, todo)


def clean_chain(store: ResultStore, plan: Plan, chain: str) -> None:
    """Delete sums a crash left behind: older running sums, folded or incomplete partials."""
    folded, current = latest_running(store, chain)
    for name in store.sums_list("running"):
        if name.startswith(f"{chain}-k") and name != current:
            store.delete_sums("running", name)
    present = set(store.sums_list("partials"))
    for unit in plan.chains()[chain]:
        if unit.name in present and (unit.block < folded or not store.sums_valid("partials", unit.name)):
            store.delete_sums("partials", unit.name)


def fold_chain(store: ResultStore, plan: Plan, chain: str, weight_of: WeightOf) -> bool:
    """Fold ``chain``'s ready partials in block order; once all are folded, write its shards. True when done."""
    units = plan.chains()[chain]
    folded, current = latest_running(store, chain)
    while folded < len(units):
        partial = units[folded].name
        if not store.sums_valid("partials", partial):
            break

        def added(partial=partial, current=current):
            for name, values in store.iter_sums("partials", partial):
                yield name, values if current is None else store.read_sum("running", current, name) + values

        following = running_name(chain, folded + 1)
        store.write_sums("running", following, added())
        if current is not None:
            store.delete_sums("running", current)
        store.delete_sums("partials", partial)
        folded, current = folded + 1, following
    if folded < len(units):
        return False
    first = units[0].start
    for tensor in plan.chain_tensors(chain):
        gradient = store.read_sum("running", current, sum_name(tensor, "gradient")) / plan.examples
        diagonal = store.read_sum("running", current, sum_name(tensor, "hessian_diagonal")) / plan.examples
        spec = plan.tensors[tensor]
        weights = weight_of(tensor)
        for shard in plan.chain_shards(chain):
            if shard.tensor != tensor:
                continue
            local = [slice(None)] * len(spec.shape)
            local[spec.shard_axis] = slice(shard.start - first, shard.stop - first)
            region = [slice(None)] * len(spec.shape)
            region[spec.shard_axis] = shard.channels
            h = diagonal[tuple(local)]
            values = {"gradient": gradient[tuple(local)], "hessian_diagonal": h,
                      "saliency": 0.5 * h * np.square(weights[tuple(region)])}
            store.record_done(shard, store.write_shard(plan, shard, values))
    store.delete_sums("running", current)
    return True
