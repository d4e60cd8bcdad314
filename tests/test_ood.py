"""Out-of-distribution detection (issue 29): the scores and figures of fixedcls.inference.ood against direct
formulas, NECO against scikit-learn's PCA, `fixedcls-eval --ood` end to end on a tiny model with an image folder
written here, and nc5 in training (`collapse.ood`) and in `python -m fixedcls.collapse --ood`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fixedcls.inference.ood import (PrincipalSubspace, auroc, detect_ood, fpr_at_tpr, logit_scores, neco_score,
                                    ood_dataset)
from utils import train_tiny


def brute_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of an ID sample > score of an OOD one), ties counting half: every pair compared."""
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def brute_fpr95(pos: np.ndarray, neg: np.ndarray) -> float:
    """The share of OOD scores >= the highest threshold that accepts at least 95% of the ID scores."""
    threshold = max(t for t in np.unique(np.concatenate([pos, neg])) if (pos >= t).mean() >= 0.95)
    return float((neg >= threshold).mean())


def test_logit_scores_are_the_direct_formulas():
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0], [30.0, -5.0, 29.0]])
    scores = logit_scores(z)
    e = np.exp(z.double().numpy())
    assert np.allclose(scores["msp"].numpy(), e.max(1) / e.sum(1), rtol=1e-14)
    assert np.allclose(scores["max_logit"].numpy(), [2.0, 0.0, 30.0])
    assert np.allclose(scores["energy"].numpy(), np.log(e.sum(1)), rtol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_and_fpr95_against_direct_formulas(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(1.0, 1.0, 200), 1)  # rounded: many ties within and across the two sets
    neg = np.round(rng.normal(0.0, 1.0, 150), 1)
    assert auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
    assert fpr_at_tpr(pos, neg) == pytest.approx(brute_fpr95(pos, neg), abs=1e-12)
    assert auroc(pos, pos) == pytest.approx(0.5) and auroc(pos + 100, neg) == pytest.approx(1.0, abs=1e-12)
    assert fpr_at_tpr(pos + 100, neg) == 0.0


def test_neco_against_sklearn_pca():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(2)
    train = 1e3 + torch.randn(600, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    test = 1e3 + 2.0 * torch.randn(50, 12, generator=g, dtype=torch.float64)
    subspace = PrincipalSubspace(12)
    for i in range(0, 600, 64):  # streamed in batches around the first batch's mean
        subspace.update(train[i : i + 64])
    mean, basis = subspace.top(5)
    pca = PCA(n_components=5).fit(train.numpy())
    reference = np.linalg.norm(pca.transform(test.numpy()), axis=1) / np.linalg.norm(test.numpy(), axis=1)
    assert np.allclose(neco_score(test, mean, basis).numpy(), reference, rtol=1e-9)


class _Toy(nn.Module):
    """features = x @ P, logits = features @ W.T (what fixedcls's Classifier returns with return_features)."""

    def __init__(self, proj: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Parameter(proj)
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight.data.copy_(weight)

    def forward(self, x, return_features=False):
        h = x @ self.proj
        logits = self.head(h)
        return (logits, h) if return_features else logits


def test_detect_ood_equals_the_scores_taken_by_hand():
    g = torch.Generator().manual_seed(3)
    K, d = 5, 8
    model = _Toy(torch.randn(6, d, generator=g), torch.randn(K, d, generator=g))
    centres = 3 * torch.randn(K, 6, generator=g)
    y_train, y_id = torch.arange(200) % K, torch.arange(60) % K
    x_train, x_id = centres[y_train] + torch.randn(200, 6, generator=g), centres[y_id] + torch.randn(60, 6, generator=g)
    x_ood = torch.randn(40, 6, generator=g)
    loader = lambda x, y: DataLoader(TensorDataset(x, y), batch_size=16)  # noqa: E731
    model.train()
    report = detect_ood(model, loader(x_id, y_id), loader(x_ood, torch.full((40,), -1)), loader(x_train, y_train),
                        components=3)
    assert model.training  # restored
    with torch.no_grad():
        (z_id, h_id), (z_ood, h_ood), h_train = model(x_id, True), model(x_ood, True), model(x_train, True)[1]
    msp = lambda z: z.double().softmax(1).max(1).values.numpy()  # noqa: E731
    assert report["scores"]["msp"]["auroc"] == pytest.approx(brute_auroc(msp(z_id), msp(z_ood)), abs=1e-12)
    assert report["scores"]["max_logit"]["fpr95"] == pytest.approx(
        brute_fpr95(z_id.double().max(1).values.numpy(), z_ood.double().max(1).values.numpy()), abs=1e-12)
    from sklearn.decomposition import PCA

    pca = PCA(n_components=3).fit(h_train.double().numpy())
    neco = lambda h: np.linalg.norm(pca.transform(h.double().numpy()), axis=1) / np.linalg.norm(h.double().numpy(), axis=1)  # noqa: E731
    assert report["scores"]["neco"]["auroc"] == pytest.approx(brute_auroc(neco(h_id), neco(h_ood)), abs=1e-12)
    mu = torch.stack([h_id[y_id == c].double().mean(0) for c in range(K)]).numpy()
    m = h_ood.double().mean(0).numpy()
    assert report["nc5"] == pytest.approx(np.mean(np.abs(mu @ m) / (np.linalg.norm(mu, axis=1) * np.linalg.norm(m))), rel=1e-6)
    assert (report["id_samples"], report["ood_samples"], report["neco_components"]) == (60, 40, 3)
    assert detect_ood(model, loader(x_id, y_id), loader(x_ood, y_id[:40]), loader(x_train, y_train))["neco_components"] == K - 1


# ------------------------------------------------------------------------------------------- end to end


def write_ood_folder(root: Path, count: int = 12) -> Path:
    """Noise images of a few sizes, some in a sub-folder (found recursively), one of them grey."""
    rng = np.random.default_rng(7)
    for i in range(count):
        size = 12 + 3 * (i % 4)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L") if i == 0 else Image.fromarray(pixels)
        path = root / ("more" if i % 3 == 0 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return root


@pytest.fixture(scope="module")
def run_with_ood(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ood")
    folder = write_ood_folder(tmp / "noise")
    train_tiny(tmp, ["trainer.threads=1", f"collapse.ood={folder}", f"checkpoint.dir={tmp / 'ckpt'}"], run_name="run")
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "folder": folder, "checkpoint": tmp / "ckpt", "rows": rows}


def test_training_writes_the_new_rows_and_nc5(run_with_ood):
    for row in run_with_ood["rows"]:
        for prefix in ("collapse/", "collapse_test/"):
            for key in ("gnc2_log", "gnc2_log_var", "unc3", "ncc_acc", "nc5"):
                assert math.isfinite(row[prefix + key]), (prefix + key, row)
            assert 0 <= row[prefix + "nc5"] <= 1 and 0 <= row[prefix + "ncc_acc"] <= 1


def test_measuring_nc5_leaves_the_training_and_the_identity_as_they_were(run_with_ood, tmp_path):
    """collapse.ood only reports: the OOD pass restores the random streams a DataLoader draws from, so the run trains
    to the same bits as one without it, under the same identity (resume=auto finds a run begun without it)."""
    from fixedcls.collapse import ood_feature_sums
    from utils import checkpoint_folder

    folder = run_with_ood["folder"]
    model, loader = _Toy(torch.randn(6, 4), torch.randn(3, 4)), DataLoader(TensorDataset(torch.randn(20, 6)), batch_size=8)
    before = torch.get_rng_state()
    sums = ood_feature_sums(model, loader, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # iterating the loader drew from it; it is put back
    assert sums[-1] == 20
    train_tiny(tmp_path, ["trainer.threads=1", f"checkpoint.dir={tmp_path / 'ckpt'}"], run_name="plain")
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    for with_ood, without in zip(run_with_ood["rows"], plain, strict=True):
        assert {k: v for k, v in with_ood.items() if not k.endswith("/nc5")} == without
    trained = [torch.load(path / "last.pt", map_location="cpu", weights_only=False)["model"]
               for path in (run_with_ood["checkpoint"], tmp_path / "ckpt")]
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])
    assert checkpoint_folder([f"collapse.ood={folder}"]) == checkpoint_folder([])


def test_eval_ood_end_to_end(run_with_ood, tmp_path, capsys):
    import fixedcls
    from fixedcls.commands.evaluate import main
    from fixedcls.data.datasets import create_data
    from fixedcls.runs.stored import stored_config

    out = tmp_path / "eval.json"
    code = main([str(run_with_ood["checkpoint"]), "--ood", str(run_with_ood["folder"]), "--json", str(out),
                 "--device", "cpu", "--no-collapse"])
    assert code == 0
    result = json.loads(out.read_text())["ood"]
    assert result["ood_samples"] == 12 and result["id_samples"] == 16 and result["neco_components"] == 3
    assert set(result["scores"]) == {"msp", "max_logit", "energy", "neco"}
    printed = capsys.readouterr().out
    assert "OOD detection" in printed and "FPR95" in printed and "energy" in printed and "nc5" in printed
    # the same figures by hand: the model's logits on the test split and on each image file
    loaded = fixedcls.load(run_with_ood["checkpoint"])
    bundle = create_data(stored_config({"config": loaded.config}, loaded.path).data)
    with torch.no_grad():
        x_id = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
        files = sorted(run_with_ood["folder"].rglob("*.png"))
        x_ood = torch.stack([loaded.transform(Image.open(p)) for p in files])
        (z_id, h_id), (z_ood, h_ood) = loaded.model(x_id, return_features=True), loaded.model(x_ood, return_features=True)
    energy = lambda z: torch.logsumexp(z.double(), 1).numpy()  # noqa: E731
    assert result["scores"]["energy"]["auroc"] == pytest.approx(brute_auroc(energy(z_id), energy(z_ood)), abs=1e-9)
    assert result["scores"]["energy"]["fpr95"] == pytest.approx(brute_fpr95(energy(z_id), energy(z_ood)), abs=1e-9)
    y_id = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    mu = torch.stack([h_id[y_id == c].double().mean(0) for c in y_id.unique()]).numpy()
    m = h_ood.double().mean(0).numpy()
    assert result["nc5"] == pytest.approx(np.mean(np.abs(mu @ m) / (np.linalg.norm(mu, axis=1) * np.linalg.norm(m))), rel=1e-5)
    # the last training epoch measured the same model against the same folder
    assert run_with_ood["rows"][-1]["collapse_test/nc5"] == pytest.approx(result["nc5"], rel=1e-5)


def test_eval_ood_from_a_preset_and_bad_sources(run_with_ood, tmp_path, capsys):
    from fixedcls.commands.evaluate import main

    out = tmp_path / "eval.json"
    assert main([str(run_with_ood["checkpoint"]), "--ood", "synthetic", "split_seed=5", "noise=3", "--json", str(out),
                 "--device", "cpu", "--no-collapse", "--neco-dim", "2"]) == 0
    result = json.loads(out.read_text())["ood"]
    assert result["source"].startswith("synthetic test split") and result["neco_components"] == 2
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for bad, says in ((["no/such/folder"], "neither a folder nor a data preset"),
                      (["synthetic", "colour=3"], "--ood colour=3"),
                      ([str(tmp_path / "empty")], "no image files"),
                      (["digits"], "3-channel images but this data has 1")):
        assert main([str(run_with_ood["checkpoint"]), "--ood", *bad, "--device", "cpu", "--no-collapse"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fixedcls-eval: error:") and says in err and "\n" not in err, err
    assert main([str(run_with_ood["checkpoint"]), "--ood", str(run_with_ood["folder"]), "--neco-dim", "9",
                 "--device", "cpu", "--no-collapse"]) == 2
    assert "NECO components must lie in [1, 3]" in capsys.readouterr().err
    assert main([str(run_with_ood["checkpoint"]), "--neco-dim", "2", "--device", "cpu", "--no-collapse"]) == 2
    assert "--neco-dim sets NECO's principal components" in capsys.readouterr().err  # nothing to set without --ood


def test_collapse_command_and_config_name_the_ood_source(run_with_ood, tmp_path, capsys):
    from fixedcls.commands.collapse import main
    from fixedcls.config import value_problem

    out = tmp_path / "collapse.json"
    assert main([str(run_with_ood["checkpoint"]), "--split", "test", "--ood", str(run_with_ood["folder"]),
                 "--json", str(out)]) == 0
    values = json.loads(out.read_text())
    assert values["collapse_test/nc5"] == pytest.approx(run_with_ood["rows"][-1]["collapse_test/nc5"], rel=1e-9)
    assert "collapse_test/gnc2_log" in values and "| collapse_test/nc5 |" in capsys.readouterr().out
    assert value_problem("collapse.ood", str(run_with_ood["folder"])) is None
    assert value_problem("collapse.ood", "synthetic noise=2") is None
    problem = value_problem("collapse.ood", "no/such/folder")
    assert problem.startswith("collapse.ood=no/such/folder is not valid") and "data preset" in problem


def test_online_training_with_ood(tmp_path):
    folder = write_ood_folder(tmp_path / "noise", count=5)
    train_tiny(tmp_path, ["trainer.threads=1", "collapse.mode=online", f"collapse.ood={folder}", "trainer.epochs=2"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["collapse/nc5"] <= 1 and 0 <= row["collapse_test/nc5"] <= 1 for row in rows)
    assert rows[0]["collapse/ncc_acc"] is None and 0 <= rows[1]["collapse/ncc_acc"] <= 1  # NaN (null) in epoch 1


def test_ood_dataset_reads_the_folder_through_the_models_transform(run_with_ood):
    import fixedcls

    loaded = fixedcls.load(run_with_ood["checkpoint"])
    dataset, source = ood_dataset([str(run_with_ood["folder"])], loaded.config["data"], loaded.preprocessing)
    x, label = dataset[0]
    assert x.shape == tuple(loaded.preprocessing["input_size"]) and label == -1
    assert len(dataset) == 12 and "image folder" in source
