import torch

from fastllm.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _save(out, step, keep_last=2):
    return save_checkpoint(out, step, model_state={"w": torch.full((3,), float(step))},
                           optimizer_state={"state": {"w": {"exp_avg": torch.ones(3)}}, "param_groups": []},
                           rng={"torch": [1, 2]}, state={"data": {"position": step}}, keep_last=keep_last)


def test_keep_last_and_load(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"]["step"] == 6 and ck["state"]["data"] == {"position": 6}
    assert torch.equal(ck["model"]["w"], torch.full((3,), 6.0))
    assert torch.equal(ck["optimizer"]["state"]["w"]["exp_avg"], torch.ones(3))
    assert ck["rng"] == {"torch": [1, 2]}


def test_partial_write_is_ignored(tmp_path):
    _save(tmp_path, 2)
    # what a kill during the write of step 4 leaves behind
    partial = tmp_path / "checkpoints" / "step_00000004.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    _save(tmp_path, 4)  # the next save cleans up and replaces it
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not partial.exists()
