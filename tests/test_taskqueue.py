"""The order of a sweep's trials on Tune (orchestrator.taskqueue.TaskQueue), without Ray: trainings and evaluations on
cached models first; a model's other evaluations once its training task ends, or recorded as not evaluated."""
import pickle

from ray.tune.search import Searcher

from orchestrator.taskqueue import TaskQueue


def task(name: str, key: str, train: bool) -> dict:
    return {"name": name, "key": key, "train": train, "trials": [{"name": name}]}


def test_an_evaluation_waits_for_its_own_model_only():
    ready = [task("a-0", "A", True), task("b-0", "B", True), task("c-0", "C", False)]
    waiting = {"A": [task("a-1", "A", False)], "B": [task("b-1", "B", False), task("b-2", "B", False)]}
    trained, dropped = {"A"}, []
    queue = TaskQueue(ready, waiting, {"parent_run_id": "p"}, model_ready=lambda key: key in trained,
                      not_evaluated=lambda key, tasks: dropped.append((key, [t["name"] for t in tasks])))
    assert [t["name"] for t in queue.tasks] == ["a-0", "b-0", "c-0", "a-1", "b-1", "b-2"]
    handed = {f"t{i}": queue.suggest(f"t{i}") for i in range(3)}
    assert [c["task"]["name"] for c in handed.values()] == ["a-0", "b-0", "c-0"]
    assert all(c["context"] == {"parent_run_id": "p"} for c in handed.values())
    assert queue.suggest("t3") is None  # a-1, b-1 and b-2 wait for their models
    queue.on_trial_complete("t2")  # an evaluation ending releases nothing
    assert queue.suggest("t3") is None
    queue.on_trial_complete("t0")  # A trained: a-1 runs, B still trains
    assert queue.suggest("t3")["task"]["name"] == "a-1" and queue.suggest("t4") is None
    queue.on_trial_complete("t1", error=True)  # B failed to train: its evaluations are recorded, not run
    assert dropped == [("B", ["b-1", "b-2"])]
    queue.on_trial_complete("t3")
    assert queue.suggest("t5") == Searcher.FINISHED


def test_the_queue_pickles_without_the_drivers_hooks(tmp_path):
    """Tune pickles its search algorithm with the experiment's state and checkpoints it (save/restore)."""
    queue = TaskQueue([task("a-0", "A", True)], {"A": [task("a-1", "A", False)]}, {}, model_ready=lambda key: True,
                      not_evaluated=lambda key, tasks: None)
    copy = pickle.loads(pickle.dumps(queue))
    assert copy.model_ready is None and copy.not_evaluated is None and copy.tasks == queue.tasks
    queue.save(str(tmp_path / "queue.json"))
    restored = TaskQueue([], {}, {})
    restored.restore(str(tmp_path / "queue.json"))
    assert restored.tasks == queue.tasks
