"""UniMedIForObjectDetection (ViTDet's simple feature pyramid + torchvision's Faster R-CNN on the frozen encoder),
the box geometry of the X-ray processor, mAP, and the detection task of training.finetune end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_hub_and_conversion import run_without_package
from tiny_configs import tiny_config

from modeling_unimedi import UniMedIForObjectDetection, UniMedIForPreTraining, UniMedIImageProcessor, UniMedIModel
from modeling_unimedi.detection_unimedi import SquareFrame

# a small detector: the paper's layout (4 levels, 4-conv box head) at widths that run in milliseconds
TINY_DETECTION = {
    "num_labels": 2,
    "detection_channels": 8,
    "detection_box_head_num_convs": 1,
    "detection_rois_per_image": 16,
}
PIXELS = torch.rand(2, 3, 32, 32)
LABELS = [
    {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 12.0, 30.0, 30.0]]), "class_labels": torch.tensor([1, 0])},
    {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)},  # an X-ray without findings
]


def tiny_detector(patch_size: int = 16, **overrides) -> UniMedIForObjectDetection:
    torch.manual_seed(0)
    config = tiny_config(**{**TINY_DETECTION, **overrides})
    config.vision_config.patch_size = patch_size
    return UniMedIForObjectDetection(config)


@pytest.mark.parametrize("patch_size", [16, 8])
def test_pyramid_levels_have_the_strides_of_vitdet_for_each_patch_size(patch_size):
    model = tiny_detector(patch_size)
    maps = model.feature_maps(torch.rand(2, 3, 32, 32))
    assert list(maps) == ["p2", "p3", "p4", "p5"]
    for name, stride in zip(maps, (4, 8, 16, 32)):
        assert maps[name].shape == (2, 8, 32 // stride, 32 // stride)
    # the grid's own stride is the identity path, finer levels deconvolve, coarser ones pool
    levels = model.feature_pyramid.levels
    own = f"p{int(np.log2(patch_size))}"
    assert not any(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.MaxPool2d)) for m in levels[own])
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in levels["p2"]) == int(np.log2(patch_size // 4))
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in levels["p5"])


def test_strides_that_are_no_power_of_two_rescale_of_the_patch_grid_are_refused():
    with pytest.raises(Exception, match="power of two"):
        tiny_config(detection_strides=(4, 8, 12, 32))
    with pytest.raises(Exception, match="one size per pyramid level"):
        tiny_config(detection_anchor_sizes=(32, 64))


def test_train_mode_loss_is_finite_and_only_non_backbone_layers_get_gradients():
    model = tiny_detector().train()
    out = model(pixel_values=PIXELS, labels=LABELS)
    assert set(out.loss_dict) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, sum(out.loss_dict.values()))
    out.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(name.startswith("vision_model.") for name in trained)
    assert not model.vision_model.training  # a frozen encoder stays in eval mode under model.train()
    for part in ("feature_pyramid.", "rpn.", "roi_heads."):
        assert any(name.startswith(part) for name in trained), part
    with pytest.raises(ValueError, match="required in train mode"):
        model(pixel_values=PIXELS)


def test_unfrozen_encoder_is_trained_too():
    model = tiny_detector(freeze_encoder=False).train()
    model(pixel_values=PIXELS, labels=LABELS).loss.backward()
    assert model.vision_model.training
    assert all(p.grad is not None for p in model.vision_model.encoder.parameters())


def test_eval_returns_boxes_inside_the_image_and_a_repeatable_loss():
    model = tiny_detector(detection_score_threshold=0.0).eval()
    with torch.no_grad():
        first, second = model(pixel_values=PIXELS, labels=LABELS), model(pixel_values=PIXELS, labels=LABELS)
    assert torch.isfinite(first.loss) and torch.equal(first.loss, second.loss)
    assert len(first.detections) == 2
    for found in first.detections:
        assert len(found["boxes"]) > 0
        assert found["boxes"].min() >= 0 and found["boxes"].max() <= 32
        assert ((found["labels"] >= 0) & (found["labels"] < 2)).all()
        assert (found["scores"][:-1] >= found["scores"][1:]).all()
    kept = model.post_process_object_detection(first, threshold=float(first.detections[0]["scores"].median()))
    assert 0 < len(kept[0]["scores"]) < len(first.detections[0]["scores"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([{"boxes": torch.tensor([[5.0, 5.0, 2.0, 9.0]]), "labels": torch.tensor([0])}] * 2, "x1 > x0"),
        ([{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([2])}] * 2, r"in \[0, 2\)"),
        ([{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])}] * 2, "needs 'boxes' and 'class_labels'"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], "1 entries for a batch of 2"),
    ],
)
def test_bad_labels_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_detector().train()(pixel_values=PIXELS, labels=labels)


def test_square_frame_matches_the_image_processors_geometry():
    """A bright rectangle drawn in a non-square X-ray lands where `SquareFrame` maps its box, crop included."""
    height, width, box = 90, 60, torch.tensor([[12.0, 30.0, 42.0, 66.0]])
    image = np.zeros((height, width), dtype=np.uint8)
    image[30:66, 12:42] = 255
    processor = UniMedIImageProcessor(longest_edge=48, crop_size=48, num_channels=1, do_normalize=False)
    processed = processor(Image.fromarray(image))["pixel_values"][0, 0]
    rows, cols = torch.nonzero(processed > 0.5, as_tuple=True)
    found = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)
    frame = SquareFrame(height, width, side=48)
    assert torch.allclose(frame.to_input(box), found, atol=1.0)
    assert torch.allclose(frame.to_image(frame.to_input(box)), box, atol=1e-4)
    cropped = SquareFrame(height, width, side=48, top=5, left=3)
    assert torch.allclose(cropped.to_input(box), frame.to_input(box) - torch.tensor([3.0, 5.0, 3.0, 5.0]))


def test_post_process_maps_boxes_back_onto_the_xray():
    model = tiny_detector()
    box_in_input = SquareFrame(64, 32, side=32).to_input(torch.tensor([[4.0, 8.0, 20.0, 40.0]]))
    detections = [
        {"scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0]), "boxes": box_in_input.repeat(2, 1)}
    ]
    from modeling_unimedi import UniMedIObjectDetectionOutput

    (result,) = model.post_process_object_detection(
        UniMedIObjectDetectionOutput(detections=detections), threshold=0.5, target_sizes=[(64, 32)]
    )
    assert result["labels"].tolist() == [1]
    assert torch.allclose(result["boxes"], torch.tensor([[4.0, 8.0, 20.0, 40.0]]), atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        model.post_process_object_detection(UniMedIObjectDetectionOutput())


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    UniMedIModel(tiny_config()).save_pretrained(root / "inference")
    pretraining = UniMedIForPreTraining(tiny_config(dino_out_dim=32, dino_hidden_dim=32, dino_bottleneck_dim=16))
    pretraining.save_pretrained(root / "pretraining")
    return {"inference": root / "inference", "pretraining": root / "pretraining"}


@pytest.mark.parametrize("kind", ["inference", "pretraining"])
def test_loads_the_encoder_from_any_unimedi_folder(saved_folders, kind):
    folder = saved_folders[kind]
    model, info = UniMedIForObjectDetection.from_pretrained(folder, output_loading_info=True, **TINY_DETECTION)
    assert info["missing_keys"] and all(
        key.startswith(("feature_pyramid.", "rpn.", "roi_heads.")) for key in info["missing_keys"]
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    source = (UniMedIModel if kind == "inference" else UniMedIForPreTraining).from_pretrained(folder)
    expected = (source.vision_model if kind == "inference" else source.unimedi.vision_model).state_dict()
    loaded = model.vision_model.state_dict()
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert model.encoder_frozen and not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the new layers were initialised


def test_save_load_round_trip_auto_class_and_remote_code(tmp_path, saved_folders):
    from transformers import AutoModelForObjectDetection

    model = UniMedIForObjectDetection.from_pretrained(saved_folders["pretraining"], **TINY_DETECTION).eval()
    model.save_pretrained(tmp_path / "det")
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForObjectDetection"] == "detection_unimedi.UniMedIForObjectDetection"
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path / "det").eval()
    assert isinstance(loaded, UniMedIForObjectDetection) and loaded.encoder_frozen
    with torch.no_grad():
        expected = model(pixel_values=PIXELS).detections
        got = loaded(pixel_values=PIXELS).detections
    assert all(
        torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["scores"], g["scores"]) for e, g in zip(expected, got)
    )
    torch.save(PIXELS, tmp_path / "pixels.pt")
    torch.save(expected[0]["boxes"], tmp_path / "boxes.pt")
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForObjectDetection
        model = AutoModelForObjectDetection.from_pretrained({str(tmp_path / "det")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            boxes = model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).detections[0]["boxes"]
        print(type(model).__name__, type(model).__module__)
        print(torch.equal(boxes, torch.load({str(tmp_path / "boxes.pt")!r})))
        """,
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
    )
    name, module = out.splitlines()[0].split()
    assert name == "UniMedIForObjectDetection" and not module.startswith("modeling_unimedi")
    assert out.splitlines()[1] == "True"


# --- training.downstream.detection -----------------------------------------------------------------------------------


def test_map_is_one_for_perfect_boxes_and_lower_for_shifted_ones():
    from training.downstream.detection import box_map

    truth = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[100.0, 80.0, 160.0, 120.0], [5.0, 5.0, 25.0, 30.0]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]

    def predicted(shift: float) -> list[dict]:
        return [
            {"boxes": t["boxes"] + shift, "scores": torch.full((len(t["boxes"]),), 0.9), "labels": t["labels"]}
            for t in truth
        ]

    perfect = box_map(predicted(0.0), truth)
    assert perfect == {"map": 1.0, "map_50": 1.0, "map_40_75": 1.0}
    # 3 px diagonally: IoU 0.60 (the 20x25 box) to 0.78, so all matched at 0.5, none above 0.8
    shifted = box_map(predicted(3.0), truth)
    assert shifted["map_50"] == 1.0
    assert shifted["map"] < shifted["map_40_75"] < 1.0
    assert box_map(predicted(0.0)[2:], truth[2:]) == {"map": None, "map_50": None, "map_40_75": None}


def xray_record_bytes(image: np.ndarray) -> dict:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_collator_moves_boxes_with_the_image_and_clips_them_to_the_crop():
    from training.downstream.detection import DATASETS, DetectionCollator

    spec = DATASETS["groundtruth-detection"]
    vision = tiny_config().vision_config  # 32-pixel input: training squares of round(32 * 256 / 224) = 37
    image = np.zeros((80, 64), dtype=np.uint8)
    image[20:60, 8:40] = 255
    box, edge_box = [8.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.0, 1.0]  # the second is sub-pixel after resizing
    record = {
        "sample_id": "x",
        "image": xray_record_bytes(image),
        "boxes": [box, edge_box],
        "box_labels": [spec.labels[1]] * 2,
    }
    evaluation = DetectionCollator(spec, vision, {}, training=False)([record])
    assert evaluation["pixel_values"].shape == (1, 3, 32, 32)
    (target,) = evaluation["labels"]
    assert target["class_labels"].tolist() == [1]
    rows, cols = torch.nonzero(evaluation["pixel_values"][0, 0] > 0.0, as_tuple=True)
    found = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    assert torch.allclose(target["boxes"][0], found, atol=1.0)
    torch.manual_seed(0)
    training = DetectionCollator(spec, vision, {}, training=True)
    for _ in range(5):
        batch = training([record])
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        boxes = batch["labels"][0]["boxes"]
        assert len(boxes) <= 1 and (boxes >= 0).all() and (boxes <= 32).all()
    with pytest.raises(ValueError, match="each box needs one name"):
        DetectionCollator(spec, vision, {}, training=False)([{**record, "box_labels": ["not-a-finding"] * 2}])
    with pytest.raises(ValueError, match="only 'random_crop'"):
        DetectionCollator(spec, vision, {"flip": True}, training=True)


def test_finetune_detection_end_to_end_on_groundtruth_boxes(tmp_path, saved_folders):
    """The ground-truth generator's DRR X-rays with their lesion boxes, through `training.finetune` (in process)."""
    from processing.groundtruth import GroundTruthConfig, generate
    from training.finetune import CONFIG_DIR, main

    data_config = GroundTruthConfig(num_xrays=12, num_cts=0, xray_size=48, split_fractions=(0.5, 0.25, 0.25))
    generate(data_config, tmp_path / "data")
    settings = {
        "dataset": "groundtruth-detection",
        "data": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "run"),
        "model": str(saved_folders["pretraining"]),
        "head_config": json.dumps({k: v for k, v in TINY_DETECTION.items() if k != "num_labels"}),
        "label_fraction": 0.5,
        "batch_size": 4,
        "num_epochs": 2,
        "report_to": "none",
    }
    main(["--config", str(CONFIG_DIR / "groundtruth_det.yaml"), *(f"{k}={v}" for k, v in settings.items())])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train_subset"] == {"size": 3, "of": 6, "seed": 0}
    assert results["metric"] == "map_40_75" and results["epochs_run"] == 2
    assert set(results["test"]) == {"loss", "map", "map_50", "map_40_75"}
    assert all(value is None or 0.0 <= value <= 1.0 for key, value in results["test"].items() if key != "loss")
    best = UniMedIForObjectDetection.from_pretrained(tmp_path / "run" / "best")
    source = UniMedIForPreTraining.from_pretrained(saved_folders["pretraining"]).unimedi.vision_model.state_dict()
    assert all(torch.equal(source[key], value) for key, value in best.vision_model.state_dict().items())
    assert best.config.detection_channels == TINY_DETECTION["detection_channels"]
