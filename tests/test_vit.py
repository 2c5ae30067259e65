"""Every method family trains with a ViT backbone (timm): a finite loss whose gradient reaches the patch
embedding, for the in-batch methods, PSM and MoCo-v2/MoCHi; and a short ViT run through the training loop
that monitors kNN, draws its plots, logs the exported model and exports/probes like a ResNet run."""

from __future__ import annotations

import json

import mlflow.pytorch
import pytest
import torch
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from pipeline import config, dist, train
from pipeline.app.cli import main
from pipeline.evaluate import encoder_from_checkpoint, evaluate_checkpoint
from pipeline.objectives import build_objective

VIT = [
    "model.backbone=vit_tiny",
    "model.patch_size=4",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "augment.image_size=8",
]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("nt_xent", []),
        ("hcl", []),
        ("sscl", ["loss.n_hard=8", "loss.n_synthetic=4"]),
        ("psm", ["loss.psm_bank_size=64", "loss.psm_n_neighbors=2"]),
        ("mochi", ["loss.mochi_queue_size=64", "loss.mochi_n_hard=8", "loss.mochi_s=0", "loss.mochi_s_prime=0"]),
        ("mochi", ["loss.mochi_queue_size=64", "loss.mochi_n_hard=8", "loss.mochi_s=4", "loss.mochi_s_prime=2"]),
    ],
)
def test_each_method_family_trains_a_vit(method, extra):
    torch.manual_seed(0)
    cfg = config.load(None, [*VIT, f"loss.name={method}", *extra])
    objective = build_objective(cfg, None, torch.Generator().manual_seed(0))
    x1, x2 = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    loss, _ = objective(x1, x2, torch.arange(16) % 4)
    assert torch.isfinite(loss)
    loss.backward()
    grad = objective.backbone.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.slow  # a training run, its plots, the exported model and a probe
def test_a_vit_run_monitors_plots_logs_its_model_and_exports(tmp_path, digits_shards):
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        *VIT,
        "model.width=64",  # tiny_config's ResNet width back to its default: a ViT takes no width
        "cluster.launcher=local",
        "tracking.plots=true",
        "tracking.log_model=true",
        "tracking.registered_model=vit-enc",
        "tracking.run_name=vit",
    )
    result = train.run(cfg, dist.current_context(), train.LocalHooks(str(tmp_path / "runs" / "vit")))
    assert result["knn_top1"] is not None and 0.0 <= result["knn_top1"] <= 1.0  # the kNN monitor ran
    client = MlflowClient(cfg.tracking.uri)
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "plots")}
    assert "plots/embedding.png" in artifacts
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model("models:/vit-enc@last")  # exported with a dynamic batch
    backbone, _, _ = encoder_from_checkpoint(str(tmp_path / "runs" / "vit"))
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone.eval()(x), rtol=1e-4, atol=1e-5)

    assert main(["export", str(tmp_path / "runs" / "vit"), str(tmp_path / "enc")]) == 0
    spec = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert spec["family"] == "vit" and spec["feature_dim"] == 192 and "timm.create_model" in spec["build_code"]
    probe = evaluate_checkpoint(
        str(tmp_path / "runs" / "vit"), digits_shards, ["eval.probe_epochs=1"], protocol="linear"
    )
    assert 0.0 <= probe["linear_top1"] <= 1.0
