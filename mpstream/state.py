"""Keyed state: per-key values of one operator instance, kept per key group.

Keys hash into ``KEY_GROUPS`` groups and instance i of n owns a contiguous range of them, so a
snapshot can be split by group and restored at another parallelism (Flink's key groups).

>>> state = KeyedState(range(128))
>>> state["a.com"] = 3
>>> state.get("a.com", 0), state.get("b.org", 0), len(state)
(3, 0, 1)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

from .batch import StringColumn
from .errors import CheckpointError
from .partition import key_groups

__all__ = ["KeyedState"]


class KeyedState:
    """Per-key values of one keyed operator instance, kept per key group (see the module doc)."""

    def __init__(self, groups: range) -> None:
        self.groups = groups
        self._by_group: dict[int, dict[Any, Any]] = {}

    def _group(self, key: Any) -> dict[Any, Any]:
        col = StringColumn.from_strings([key]) if isinstance(key, str) else np.array([key])
        return self._by_group.setdefault(int(key_groups(col)[0]), {})

    def get(self, key: Any, default: Any = None) -> Any:
        return self._group(key).get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._group(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._group(key)[key] = value

    def __len__(self) -> int:
        return sum(len(values) for values in self._by_group.values())

    def items(self) -> Iterable[tuple[Any, Any]]:
        return ((k, v) for values in self._by_group.values() for k, v in values.items())

    def snapshot(self) -> dict[int, dict[Any, Any]]:
        """{key group: {key: value}}, a deep copy: values the operator goes on changing in
        place (a numpy array, a list) stay as they were at the barrier in the checkpoint."""
        return {group: copy.deepcopy(values) for group, values in self._by_group.items() if values}

    def restore(self, snapshots: Iterable[dict[int, dict[Any, Any]] | None], own_only: bool = False) -> None:
        """Takes this instance's key groups out of snapshots of any number of instances; with
        ``own_only`` (its own snapshot, at an unchanged parallelism) every group it holds. A key
        held by two old instances (an input not partitioned by key: rebalanced, salted) is an
        error: one value would silently replace the other."""
        for snapshot in snapshots:
            for group, values in (snapshot or {}).items():
                if own_only or group in self.groups:
                    held = self._by_group.setdefault(group, {})
                    if clash := held.keys() & values.keys():
                        raise CheckpointError(
                            f"key {next(iter(clash))!r} has state in more than one old instance (the input is not "
                            f"partitioned by key), which cannot be split between new ones; resume at the old "
                            f"parallelism, or key the input (key_by)")
                    held.update(values)
