"""`fastsae train`: a small synthetic job ends with the metrics table, saves a loadable SAE, and resumes."""
import json

import numpy as np
import pytest
import torch

import fastsae
from fastsae.cli import build_parser, main
from fastsae.training import DEFAULT_JOB

SMALL = ["--d-in", "16", "--n-features", "32", "--width", "64", "--k", "3", "--n-samples", "4000",
         "--batch-size", "128", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_main_job():
    args = build_parser().parse_args(["train"])
    assert args.arch == "topk" and args.data == "synthetic" and args.steps == DEFAULT_JOB["steps"]
    assert args.d_in == DEFAULT_JOB["d_in"] and args.n_features == DEFAULT_JOB["n_features"]


def test_train_prints_table_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "30", "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    for row in ("held-out FVU", "held-out L0", "dead latents", "feature recovery (cos>0.9)", "tokens/s"):
        assert row in text, row
    sae = fastsae.load(out / "sae")
    assert isinstance(sae, fastsae.TopKSAE) and sae.k == 3 and sae.d_sae == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and 0 <= summary["recovery"] <= 1 and summary["fvu"] < 1.5
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1
    # --resume with more steps continues from the checkpoint (step 30) instead of starting over
    with pytest.warns(UserWarning, match="steps=40"):  # a longer schedule than the checkpoint's: said aloud
        assert main(["train", "--steps", "40", "--out", str(out), "--resume", *SMALL]) == 0
    capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["tokens"] == 40 * 128


def test_train_jumprelu_on_a_shard_folder(tmp_path, capsys):
    acts = tmp_path / "acts"
    acts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(acts / f"{i:05d}.npy", np.abs(rng.normal(size=(300, 8))).astype(np.float16))
    assert main(["train", "--arch", "jumprelu", "--lambda", "0.01", "--data", str(acts), "--steps", "5",
                 "--batch-size", "64", "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "held-out FVU" in text and "feature recovery" not in text  # no true dictionary for real data
    sae = fastsae.load(tmp_path / "run" / "sae")
    assert isinstance(sae, fastsae.JumpReLUSAE) and sae.d_sae == 16 * 8 and sae.sparsity_coefficient == 0.01


@pytest.mark.parametrize("arch, cls", [("abstopk", "AbsTopKSAE"), ("matryoshka_batchtopk", "MatryoshkaBatchTopKSAE")])
def test_train_the_newer_architectures_from_the_command_line(tmp_path, capsys, arch, cls):
    out = tmp_path / "run"
    assert main(["train", "--arch", arch, "--steps", "10", "--out", str(out), *SMALL]) == 0
    assert "held-out FVU" in capsys.readouterr().out
    sae = fastsae.load(out / "sae")
    assert type(sae).__name__ == cls and sae.k == 3 and sae.d_sae == 64
    if arch == "matryoshka_batchtopk":
        assert sae.widths == [4, 16, 64]  # nested prefixes at 1/16, 1/4 and all of --width
