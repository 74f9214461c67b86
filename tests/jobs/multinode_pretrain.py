"""Run the tiny pretraining job on a 3-node Ray cluster on this machine; print a JSON line with the result.

Started by ``test_pretrain.py`` in its own process, since one process holds one Ray connection. Usage:
``python multinode_pretrain.py CONFIG.json RESULT.json`` (the result goes to a file: Ray prints to stdout at shutdown).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from brainiac.platform.cluster import configure_ray_environment


def main(spec: str, result: str) -> None:
    configure_ray_environment()
    from ray.cluster_utils import Cluster

    from brainiac.jobs.config import Config
    from brainiac.jobs.pretrain.run import pretrain
    from brainiac.platform.config import from_dict

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 128 << 20},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, object_store_memory=128 << 20)
        cluster.wait_for_nodes()
        data = json.loads(Path(spec).read_text())
        data["cluster"]["address"] = cluster.address
        summary = pretrain(from_dict(Config, data), progress=False)
        import ray

        nodes = len([n for n in ray.nodes() if n["Alive"]])
        Path(result).write_text(
            json.dumps({"steps": summary.steps, "workers": summary.workers, "cluster_nodes": nodes})
        )
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
