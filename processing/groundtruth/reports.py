"""Reports for the ground-truth benchmark: varied X-ray and CT wording written from known findings, and a parser that
reads the findings back, so tests can prove that every report states exactly its labels.

Vocabulary (the ``labels`` of a record): ``nodule``, ``pleural_effusion``, ``consolidation``, or ``normal`` alone.
Locations are lobes (``right_upper_lobe`` ...) for nodules and consolidations and sides (``right``, ``left``,
``bilateral``) for effusions. X-ray reports may name a lung zone instead of a lobe; in this benchmark a zone always
stands for the lobe the lesion was inserted in (upper/mid/lower zone = upper/middle/lower lobe).
"""

import re
from dataclasses import dataclass

import numpy as np

from modeling_unimedi.report_processing_unimedi import FINDINGS as FINDINGS_SECTION
from modeling_unimedi.report_processing_unimedi import IMPRESSION, join_sections, split_sentences

from ..schema import CT, XRAY

NODULE = "nodule"
PLEURAL_EFFUSION = "pleural_effusion"
CONSOLIDATION = "consolidation"
NORMAL = "normal"
FINDING_NAMES = (NODULE, PLEURAL_EFFUSION, CONSOLIDATION)
VOCABULARY = (*FINDING_NAMES, NORMAL)

RIGHT, LEFT, BILATERAL = "right", "left", "bilateral"
LOBES = ("right_upper_lobe", "right_middle_lobe", "right_lower_lobe", "left_upper_lobe", "left_lower_lobe")
EFFUSION_SEVERITIES = ("small", "moderate", "large")
CONSOLIDATION_EXTENTS = ("patchy", "lobar")  # lobar: most of the lobe


@dataclass(frozen=True)
class Finding:
    """One reported finding. ``lobe`` is set for nodules and consolidations, ``side`` always; ``size_mm`` is a
    nodule's long-axis diameter, ``severity`` an effusion's size or a consolidation's extent."""

    name: str
    side: str
    lobe: str | None = None
    size_mm: int | None = None
    severity: str | None = None
    air_bronchograms: bool = False

    def key(self) -> tuple:
        """What the parser must recover: finding, side, lobe and nodule size."""
        return (self.name, self.side, self.lobe, self.size_mm)


def labels_of(findings) -> list[str]:
    """The record's label list: the sorted finding names, or ``["normal"]`` when there are none."""
    return sorted({finding.name for finding in findings}) or [NORMAL]


def side_of(lobe: str) -> str:
    return lobe.split("_", 1)[0]


# --- writing ---------------------------------------------------------------------------------------------------------


def _lobe_words(lobe: str) -> str:
    return lobe.replace("_", " ")


def _zone_words(lobe: str) -> str:
    side, level, _ = lobe.split("_")
    return f"{side} {'mid' if level == 'middle' else level} zone"


def _location(lobe: str, modality: str, rng: np.random.Generator) -> str:
    """Where an X-ray report places a lesion: a lobe or the matching zone; CT reports always name the lobe."""
    if modality == XRAY and rng.random() < 0.5:
        return _zone_words(lobe)
    return _lobe_words(lobe)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _nodule_sentence(finding: Finding, modality: str, rng) -> str:
    where, size = _location(finding.lobe, modality, rng), finding.size_mm
    if modality == XRAY:
        options = (
            f"There is a {size} mm nodular opacity in the {where}.",
            f"A {size} mm rounded opacity projects over the {where}, compatible with a pulmonary nodule.",
            f"{size} mm nodule in the {where}.",
        )
    else:
        options = (
            f"A solid nodule measuring {size} mm is present in the {where}.",
            f"There is a {size} mm pulmonary nodule in the {where}.",
            f"Nodule measuring {size} mm in the {where}.",
        )
    return _pick(rng, options)


def _effusion_sentence(finding: Finding, modality: str, rng) -> str:
    severity, side = finding.severity, finding.side
    if side == BILATERAL:
        if modality == XRAY:
            options = (
                f"Blunting of both costophrenic angles, consistent with {severity} bilateral pleural effusions.",
                f"{severity} bilateral pleural effusions with meniscus-shaped opacities at both lung bases.",
            )
        else:
            options = (
                f"{severity} bilateral pleural effusions with dependent fluid layering posteriorly.",
                f"Dependent fluid in both pleural spaces, consistent with {severity} bilateral pleural effusions.",
            )
    elif modality == XRAY:
        options = (
            f"Blunting of the {side} costophrenic angle, consistent with a {severity} {side} pleural effusion.",
            f"{severity} {side} pleural effusion with a meniscus at the {side} lung base.",
        )
    else:
        options = (
            f"{severity} {side} pleural effusion with dependent fluid layering posteriorly.",
            f"Dependent fluid in the {side} pleural space, consistent with a {severity} {side} pleural effusion.",
        )
    return _capitalised(_pick(rng, options))


def _consolidation_sentence(finding: Finding, modality: str, rng) -> str:
    where = _location(finding.lobe, modality, rng)
    bronchograms = " with air bronchograms" if finding.air_bronchograms else ""
    extent = "most of" if finding.severity == "lobar" else "part of"
    if modality == XRAY:
        options = (
            f"Airspace opacity in the {where}{bronchograms}, consistent with consolidation.",
            f"Focal consolidation in the {where}{bronchograms}.",
            f"There is {finding.severity} consolidation in the {where}{bronchograms}.",
        )
    else:
        options = (
            f"Consolidation involving {extent} the {where}{bronchograms}.",
            f"There is {finding.severity} consolidation in the {where}{bronchograms}.",
            f"Dense airspace consolidation occupies {extent} the {where}{bronchograms}.",
        )
    return _pick(rng, options)


_POSITIVE_WRITERS = {
    NODULE: _nodule_sentence,
    PLEURAL_EFFUSION: _effusion_sentence,
    CONSOLIDATION: _consolidation_sentence,
}

_SHARED_NEGATIONS = {
    NODULE: ("No pulmonary nodules.", "No suspicious pulmonary nodule is seen.", "There is no nodule or mass."),
    CONSOLIDATION: (
        "No focal consolidation.",
        "The lungs are clear without consolidation.",
        "No airspace consolidation.",
    ),
}
_NEGATIONS = {
    XRAY: {**_SHARED_NEGATIONS, PLEURAL_EFFUSION: ("No pleural effusion.", "The costophrenic angles are sharp.")},
    CT: {**_SHARED_NEGATIONS, PLEURAL_EFFUSION: ("No pleural effusion.", "There is no pleural fluid.")},
}

_INTRODUCTIONS = {
    XRAY: (
        "PA chest radiograph.",
        "PA view of the chest was obtained.",
        "Single frontal PA radiograph of the chest.",
    ),
    CT: (
        "Contrast-enhanced axial CT of the chest.",
        "Axial CT images of the chest were obtained after intravenous contrast.",
        "Axial CT of the chest with multiplanar reformats was reviewed.",
    ),
}

_BACKGROUND = {
    XRAY: (
        "Heart size is normal.",
        "The cardiomediastinal silhouette is within normal limits.",
        "No pneumothorax.",
        "The visualized osseous structures are unremarkable.",
    ),
    CT: (
        "The heart is normal in size.",
        "The central airways are patent.",
        "No mediastinal lymphadenopathy.",
        "No pneumothorax.",
    ),
}

_NORMAL_IMPRESSIONS = {
    XRAY: ("No acute cardiopulmonary abnormality.", "Normal chest radiograph."),
    CT: ("No acute intrathoracic abnormality.", "Normal CT of the chest."),
}


def _impression_phrase(finding: Finding) -> str:
    if finding.name == NODULE:
        return f"{finding.size_mm} mm {_lobe_words(finding.lobe)} nodule."
    if finding.name == PLEURAL_EFFUSION:
        plural = "s" if finding.side == BILATERAL else ""
        return _capitalised(f"{finding.severity} {finding.side} pleural effusion{plural}.")
    return _capitalised(f"{_lobe_words(finding.lobe)} consolidation.")


def write_report(findings, modality: str, rng: np.random.Generator) -> str:
    """A FINDINGS + IMPRESSION report (headers left out, as ``join_sections`` gives training text) stating every
    finding with its location and size, negating some absent findings, with at least three sentences."""
    if modality not in (XRAY, CT):
        raise ValueError(f"modality must be {XRAY!r} or {CT!r}, got {modality!r}")
    present = {finding.name for finding in findings}
    sentences = [_pick(rng, _INTRODUCTIONS[modality])]
    sentences += [_POSITIVE_WRITERS[finding.name](finding, modality, rng) for finding in findings]
    sentences += [
        _pick(rng, _NEGATIONS[modality][name]) for name in FINDING_NAMES if name not in present and rng.random() < 0.8
    ]
    background = _BACKGROUND[modality]
    sentences += [
        background[i] for i in sorted(rng.choice(len(background), size=int(rng.integers(1, 3)), replace=False))
    ]
    if findings:
        impression = " ".join(_impression_phrase(finding) for finding in findings)
    else:
        impression = _pick(rng, _NORMAL_IMPRESSIONS[modality])
    return join_sections({FINDINGS_SECTION: " ".join(sentences), IMPRESSION: impression})


# --- parsing ---------------------------------------------------------------------------------------------------------

_FINDING_PATTERNS = {
    NODULE: re.compile(r"\bnodul(?:e|es|ar)\b"),
    PLEURAL_EFFUSION: re.compile(r"\beffusions?\b|\bpleural fluid\b|\bdependent fluid\b|\bblunting of\b"),
    CONSOLIDATION: re.compile(r"\bconsolidation\b|\bairspace opacity\b"),
}
_NEGATION_CUE = re.compile(r"\b(?:no|without|negative for|free of)\b")
_LOBE_OR_ZONE = re.compile(r"\b(right|left) (upper|middle|mid|lower) (?:lobe|zone)\b")
_SIZE = re.compile(r"\b(\d+) mm\b")
_SIDE = re.compile(r"\b(bilateral|both|right|left)\b")


def _lobe_in(sentence: str) -> str | None:
    match = _LOBE_OR_ZONE.search(sentence)
    if match is None:
        return None
    side, level = match.groups()
    return f"{side}_{'middle' if level == 'mid' else level}_lobe"


def _effusion_side(sentence: str) -> str | None:
    words = set(_SIDE.findall(sentence))
    if words & {BILATERAL, "both"} or {RIGHT, LEFT} <= words:
        return BILATERAL
    return words.pop() if len(words) == 1 else None


def _finding_in(name: str, sentence: str) -> Finding:
    if name == PLEURAL_EFFUSION:
        return Finding(name, _effusion_side(sentence))
    lobe = _lobe_in(sentence)
    size = _SIZE.search(sentence) if name == NODULE else None
    return Finding(name, side_of(lobe) if lobe else None, lobe, int(size.group(1)) if size else None)


def parse_report(report: str) -> list[Finding]:
    """The positive findings a report states, one per (finding, side, lobe, size), negated mentions left out.

    A mention is negated when a negation cue ("no", "without", "negative for", "free of") precedes it in its
    sentence. Repeats (findings sentence and impression) collapse into one finding.
    """
    found = {}
    for sentence in split_sentences(report):
        lowered = sentence.lower()
        for name, pattern in _FINDING_PATTERNS.items():
            match = pattern.search(lowered)
            if match is None or _NEGATION_CUE.search(lowered[: match.start()]):
                continue
            finding = _finding_in(name, lowered)
            found.setdefault(finding.key(), finding)
    return list(found.values())


def parse_labels(report: str) -> list[str]:
    """The label list (see ``labels_of``) a report states."""
    return labels_of(parse_report(report))
