"""benchmarks/accelerator_check.py: its equality check catches a wrong path, its runner reports
a script's failure and device, and a bad flag is one line. All on CPU, at tiny sizes."""

import importlib.util

import pytest

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("accelerator_check",
                                              REPO_ROOT / "benchmarks" / "accelerator_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

TINY = dict(batch=1, seq_len=16, d_model=8, d_ff=16, num_experts=4)


def test_dispatch_paths_agree_and_a_different_layer_is_caught(monkeypatch):
    result = check.dispatch_equality(**TINY)
    assert result["passed"] and set(result["paths"]) == {"gather", "einsum", "ragged"}
    assert 0 < result["fraction_dropped"] < 1  # the train capacity factor drops some
    assert all(row["output_max_abs_diff"] <= 1e-5 for row in result["paths"].values())

    # A ragged layer with other parameters (seed 1) stands in for a path that computes wrongly.
    same_seed = check.moe.layers_per_dispatch
    monkeypatch.setattr(check.moe, "layers_per_dispatch", lambda cfg: {
        **same_seed(cfg), "ragged": same_seed(cfg, seed=1)["ragged"]})
    result = check.dispatch_equality(**TINY)
    assert not result["passed"] and not result["paths"]["ragged"]["passed"]
    assert result["paths"]["gather"]["passed"] and result["paths"]["ragged"]["output_gap"] > 0.01


def test_a_failing_script_reports_its_status_device_and_output(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys, jax\njax.numpy.ones(2)\nsys.exit('self-test FAILED: on purpose')\n")
    run = check.run_script([str(script)], timeout=120)
    assert run["returncode"] == 1 and run["device"].endswith("(cpu)")
    assert "self-test FAILED: on purpose" in run["output_tail"]
    assert check.DEVICE_MARK not in run["output_tail"]


def test_a_bad_flag_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        check.main(["--qiuck"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unrecognized arguments: --qiuck")
