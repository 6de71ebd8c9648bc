"""One short multi-node fault run on Ray's simulated cluster (the long trials are benchmarks/faults.py): a worker
node removed while the group dataset is generated and again while a LoRA trains elastically."""

import random


def test_a_node_lost_mid_generation_and_mid_training(load_script, tmp_path):
    faults = load_script("benchmarks/faults.py")
    sizes = faults.Sizes(prompts=12, train_steps=8, checkpoint_every=2, fault_delay=0.0, most_node_losses=1,
                         back_after_resume=False)
    cluster = faults.LocalCluster()
    try:
        rng = random.Random(0)
        generated = faults.generation_trial(cluster, rng, sizes, tmp_path / "groups", "generation")
        assert generated["faults"] >= 1 and generated["finished"], generated["error"]
        assert generated["prompts_lost"] == 0 and generated["prompts_duplicated"] == 0
        while len(cluster.workers) < 2:
            cluster.add_worker()
        trained = faults.training_trial(cluster, rng, sizes, tmp_path / "groups", tmp_path / "train", "training")
        assert trained["faults"] >= 1 and trained["finished"], trained["error"]
        # Each restart (a node lost, or the run grown back) goes back at most to the last checkpoint, and the
        # elastic run went on with the workers it had.
        assert trained["steps_repeated"] <= sizes.checkpoint_every * len(trained["resumed_on_workers"])
        assert trained["resumed_on_workers"] and min(trained["resumed_on_workers"]) >= 1
    finally:
        cluster.shutdown()
