"""Auto* registration, Hub-cache loading offline, remote code without the package, and pretrained-part conversion."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_configs import TINY_VISION, minilm_path, tiny_config

import modeling_unimedi
from modeling_unimedi import UniMedIConfig, UniMedIModel
from modeling_unimedi.convert_unimedi import inflate_patch_kernel, unimedi_from_pretrained_parts


def run_python(code: str, cwd, **env) -> str:
    """Run `code` in a fresh interpreter outside the repository; return stdout (fails with its stderr)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# A fresh interpreter in which `import modeling_unimedi` fails, as on a machine where only the Hub folder exists.
WITHOUT_PACKAGE = """
import sys
sys.modules["modeling_unimedi"] = None
try:
    import modeling_unimedi
    raise SystemExit("modeling_unimedi is still importable")
except ImportError:
    pass
"""


def run_without_package(code: str, cwd, **env) -> str:
    """`run_python` where the UniMedI package cannot be imported: remote code must carry everything."""
    return run_python(WITHOUT_PACKAGE + textwrap.dedent(code), cwd, **env)


def place_in_hub_cache(folder, hub, repo_id: str) -> None:
    """Copy a saved folder into a Hub cache layout (`hub/models--org--name/snapshots/<commit>`, refs/main), as
    `from_pretrained(repo_id)` finds a downloaded repository with HF_HUB_CACHE=hub and HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file():
            (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_auto_classes_resolve_unimedi(tmp_path):
    from transformers import AutoConfig, AutoModel

    model = UniMedIModel(tiny_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "unimedi"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_unimedi.UniMedIConfig",
        "AutoModel": "modeling_unimedi.UniMedIModel",
        "AutoModelForZeroShotImageClassification": "modeling_unimedi.UniMedIModel",
        "AutoModelForPreTraining": "pretraining_unimedi.UniMedIForPreTraining",
        "AutoModelForSemanticSegmentation": "segmentation_unimedi.UniMedIForSemanticSegmentation",
    }
    assert set(config["custom_pipelines"]) == {"zero-shot-volume-classification", "volume-feature-extraction"}
    package = Path(modeling_unimedi.__file__).parent
    assert {p.name for p in package.glob("*_unimedi.py")} <= {p.name for p in tmp_path.glob("*.py")}
    assert isinstance(AutoConfig.from_pretrained(tmp_path), UniMedIConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), UniMedIModel)


def _save_with_reference(tmp_path):
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config()).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    inputs = {
        "input_ids": torch.randint(1, 100, (2, 7)),
        "pixel_values": torch.rand(1, 3, 32, 32),
        "volume_values": torch.rand(1, 1, 8, 32, 32),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.inference_mode():
        torch.save(model(**inputs).logits_per_image, tmp_path / "expected.pt")
    return folder


def test_remote_code_loads_without_the_package(tmp_path):
    folder = _save_with_reference(tmp_path)
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.inference_mode():
            logits = model(**inputs).logits_per_image
        print(type(model).__module__)
        print(torch.allclose(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6))
        """,
        cwd=tmp_path,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
    )
    module, same = out.split()
    assert module.startswith("transformers_modules.") and same == "True"


def test_pretraining_model_remote_code_loads_without_the_package(tmp_path):
    """The pretraining export (student, EMA teacher, heads, centres) round-trips through remote code: same losses."""
    from modeling_unimedi import UniMedIForPreTraining

    torch.manual_seed(0)
    config = tiny_config(dino_out_dim=32, dino_hidden_dim=16, dino_bottleneck_dim=8, num_selected_slices=1)
    model = UniMedIForPreTraining(config).eval()
    with torch.no_grad():  # a teacher and centres of their own, as after training
        for param in model.teacher.parameters():
            param.add_(0.1 * torch.randn_like(param))
        model.cls_center.normal_()
    model.save_pretrained(tmp_path / "export")
    inputs = {
        "input_ids": torch.randint(1, 100, (2, 7)),
        "pixel_values": torch.rand(1, 3, 32, 32),
        "volume_values": torch.rand(1, 1, 8, 32, 32),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.inference_mode():
        expected = model(**inputs)
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True).eval()
        with torch.inference_mode():
            out = model(**torch.load({str(tmp_path / "inputs.pt")!r}))
        print(type(model).__name__, out.vl_loss.item(), out.icl_loss.item(), out.pcl_loss.item())
        """,
        cwd=tmp_path,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
    )
    name, *losses = out.split()
    assert name == "UniMedIForPreTraining"
    assert [float(x) for x in losses] == pytest.approx(
        [expected.vl_loss.item(), expected.icl_loss.item(), expected.pcl_loss.item()], rel=1e-5
    )


def test_from_pretrained_hub_id_through_offline_cache(tmp_path):
    """`from_pretrained("org/unimedi-vitb16")` resolves from a Hub cache layout with HF_HUB_OFFLINE=1."""
    folder = _save_with_reference(tmp_path)
    place_in_hub_cache(folder, tmp_path / "hub", "org/unimedi-vitb16")
    out = run_python(
        f"""
        import torch
        import modeling_unimedi
        from modeling_unimedi import UniMedIModel
        from transformers import AutoModel
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for loader in (UniMedIModel, AutoModel):
            model = loader.from_pretrained("org/unimedi-vitb16").eval()
            with torch.inference_mode():
                print(type(model).__name__, torch.allclose(model(**inputs).logits_per_image, expected, atol=1e-6))
        """,
        cwd=os.getcwd(),
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.getcwd(),
    )
    assert out.split() == ["UniMedIModel", "True", "UniMedIModel", "True"]


def test_timm_checkpoint_conversion_reproduces_timm(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=0
    ).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file(vit.state_dict(), path)
    model = unimedi_from_pretrained_parts(path, vision_config=dict(TINY_VISION), text_config=tiny_config().text_config)
    vision = model.vision_model.eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(vision(pixel_values=images).pooler_output, vit.forward_features(images)[:, 0], atol=1e-5)
        # the inflated 3D tokenizer sees a depth-constant grayscale volume as timm sees the gray image
        gray = images.mean(dim=1, keepdim=True)
        volume = gray.unsqueeze(2).expand(-1, -1, 8, -1, -1)
        tokens_3d = vision.volume_embeddings.projection(volume).flatten(3)  # (B, hidden, depth slabs, h*w)
        tokens_2d = vit.patch_embed.proj(gray.expand(-1, 3, -1, -1)).flatten(2)
        assert torch.allclose(tokens_3d[:, :, 0], tokens_2d, atol=1e-5)
        assert torch.allclose(tokens_3d[:, :, 1], tokens_2d, atol=1e-5)


def test_inflation_resizes_kernel_for_other_patch_sizes():
    kernel = inflate_patch_kernel(torch.rand(8, 3, 16, 16), (2, 8, 8), in_channels=1)
    assert kernel.shape == (8, 1, 2, 8, 8)


def test_timm_conversion_rejects_mismatched_depth():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=4, num_classes=0
    )
    with pytest.raises(ValueError, match="3 blocks"):
        unimedi_from_pretrained_parts(vit, vision_config=dict(TINY_VISION), text_config=tiny_config().text_config)


def test_real_pretrained_text_encoder_is_loaded_intact():
    """The real all-MiniLM-L6-v2 BERT becomes the text tower; its [CLS] state is unchanged by the conversion."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = unimedi_from_pretrained_parts(text_checkpoint=path, vision_config=dict(TINY_VISION)).eval()
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModel.from_pretrained(path).eval()
    inputs = tokenizer(
        ["No acute cardiopulmonary process.", "Small left pleural effusion."], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        ours = model.get_text_features(**inputs).last_hidden_state[:, 0]
        theirs = reference(**inputs).last_hidden_state[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not any(name.startswith("text_model.pooler") for name in model.state_dict())
