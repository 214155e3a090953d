"""Starting a rollout queues the deltas its nodes will ask for, from the releases they run (issue 11).

The release service never computes a delta for a request; the rollout engine asks the store to
make them ahead of time, in its background worker, from every baseline the targeted nodes have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import certs
from fleet.controller.facade import NodeStatus, NodeView, NotFound, RolloutRequest
from fleet.controller.rollouts import RolloutEngine
from fleet.controller.storage import Database
from fleet.protocol.messages import ReleaseRef
from fleet.protocol.signing import load_private_key
from fleet.releases import ReleaseManifest, ReleaseStore, build_release
from tests.releases import binaryish, make_tree, patch

pytestmark = pytest.mark.timeout(120)


class Fleet:
    def __init__(self, views: list[NodeView]) -> None:
        self.views = {view.id: view for view in views}

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        return list(self.views.values())

    def node_view(self, node_id: str) -> NodeView:
        if node_id not in self.views:
            raise NotFound(node_id)
        return self.views[node_id]


class Desired:
    def __init__(self, current: dict[str, ReleaseRef | None]) -> None:
        self.current = current

    def publish_release(self, node: str, release: ReleaseRef | None) -> int:
        self.current[node] = release
        return 1

    def current_release(self, node: str) -> ReleaseRef | None:
        return self.current.get(node)


class Commands:
    def send(self, node: str, action: str, args: Any = None, expires_in: float = 3600.0, rollout_id: Any = None) -> Any:
        return None


def test_rollout_start_prepares_the_deltas_from_the_nodes_baselines(tmp_path: Path) -> None:
    key = load_private_key(certs.init_pki(tmp_path / "pki").release_key.read_bytes())
    program = binaryish(3, 400_000)
    contents = {"1.0.0": program, "1.1.0": patch(program, 4, edits=3, edit_size=64)}
    contents["2.0.0"] = patch(contents["1.1.0"], 5, edits=3, edit_size=64)

    def build(version: str) -> ReleaseManifest:
        source = make_tree(tmp_path / version, app=bytes(contents[version]))
        return build_release(
            source,
            name="app",
            version=version,
            store=tmp_path / "store",
            release_key=key,
            entry=["./run"],
            health=None,
            chunk_size=16 * 1024,
        )

    v1, v11, v2 = build("1.0.0"), build("1.1.0"), build("2.0.0")
    store = ReleaseStore(tmp_path / "store")
    # Two nodes on 1.0.0, one on 1.1.0, one with no release yet, one already on the target.
    baselines = {"gw-1": v1, "gw-2": v1, "gw-3": v11, "gw-4": None, "gw-5": v2}
    views = [NodeView(id=node, status=NodeStatus.ONLINE) for node in baselines]
    desired = Desired({node: None if base is None else base.ref() for node, base in baselines.items()})
    db = Database(tmp_path / "fleet.db")
    try:
        engine = RolloutEngine(db, Fleet(views), desired, Commands(), store)
        engine.start(RolloutRequest(release="app@2.0.0", waves=["100%"]))
        assert store.wait_prepared(90)
    finally:
        store.close()
        db.close()
    stats = store.delta_stats()
    assert (stats.queued, stats.made, stats.failed) == (2, 2, 0)  # one per distinct base, not per node
    assert store.prepared_delta(v2, v1.digest) is not None
    assert store.prepared_delta(v2, v11.digest) is not None
    assert sorted(path.name for path in (store.root / "app" / "deltas").iterdir()) == sorted(
        f"{base.digest[7:]}-{v2.digest[7:]}.zst" for base in (v1, v11)
    )
