"""Deterministic reduction: partial sums of work units fold into the final arrays in block order.

For each channel group, running(k) is the float64 sum of blocks 0..k-1, always formed as
running(k) + partial(k), so the final arrays are bit-identical whatever the number of
workers, the order units finish, retries and resumes. A partial is deleted once folded,
so a store holds O(size of W x units in flight) of partial sums.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.plan import Plan, Unit
from pipeline.store import ResultStore


def partial_name(group: int, block: int) -> str:
    return f"g{group:05d}-b{block:05d}"


def running_name(group: int, folded: int) -> str:
    return f"g{group:05d}-k{folded:05d}"


def latest_running(store: ResultStore, group: int) -> tuple[int, tuple | None]:
    """(blocks folded, their sums) of ``group``'s newest complete running sum; (0, None) when there is none."""
    prefix = f"g{group:05d}-k"
    for name in sorted((n for n in store.sums_names("running") if n.startswith(prefix)), reverse=True):
        sums = store.valid_sums("running", name)
        if sums is not None:
            return int(name[len(prefix):]), sums
    return 0, None


def folded_blocks(store: ResultStore, group: int) -> int:
    """How many blocks of ``group`` the newest complete running sum holds (0: none yet)."""
    return latest_running(store, group)[0]


def group_complete(plan: Plan, group: int, done_shards: set[int]) -> bool:
    return all(shard.index in done_shards for shard in plan.shards_of(group))


@dataclass
class UnitState:
    """Which units are done (folded, or with valid partial sums) and which remain."""

    done: list[Unit]
    todo: list[Unit]


def unit_state(store: ResultStore, plan: Plan, done_shards: set[int]) -> UnitState:
    done, todo, folded = [], [], {}
    for unit in plan.units:
        if group_complete(plan, unit.group, done_shards):
            done.append(unit)
            continue
        if unit.group not in folded:
            folded[unit.group] = folded_blocks(store, unit.group)
        finished = unit.block < folded[unit.group] or store.sums_valid("partials", unit.name)
        (done if finished else todo).append(unit)
    return UnitState(done, todo)


def clean_group(store: ResultStore, plan: Plan, group: int) -> None:
    """Delete sums a crash left behind: older running sums, folded or incomplete partials."""
    folded = folded_blocks(store, group)
    for name in store.sums_names("running"):
        if name.startswith(f"g{group:05d}-k") and name != running_name(group, folded):
            store.delete_sums("running", name)
    present = set(store.sums_names("partials"))
    for block in range(plan.blocks):
        name = partial_name(group, block)
        if block < folded or (name in present and not store.sums_valid("partials", name)):
            store.delete_sums("partials", name)


def fold_group(store: ResultStore, plan: Plan, group: int) -> bool:
    """Fold ``group``'s ready partials in block order; once all are folded, write its shards. True when done."""
    folded, running = latest_running(store, group)
    while folded < plan.blocks:
        partial = store.valid_sums("partials", partial_name(group, folded))
        if partial is None:
            break
        running = partial if running is None else (running[0] + partial[0], running[1] + partial[1])
        store.write_sums("running", running_name(group, folded + 1), *running)
        store.delete_sums("running", running_name(group, folded))
        store.delete_sums("partials", partial_name(group, folded))
        folded += 1
    if folded < plan.blocks:
        return False
    gradient, diagonal = running[0] / plan.examples, running[1] / plan.examples
    first = plan.groups[group][0]
    for shard in plan.shards_of(group):
        local = slice(shard.start - first, shard.stop - first)
        store.record_done(shard, store.write_shard(shard, gradient[..., local], diagonal[..., local]))
    store.delete_sums("running", running_name(group, folded))
    return True
