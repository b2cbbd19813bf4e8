"""Report handling: section extraction (MIMIC-CXR free text, Open-i XML), cleanup, sentence counting, validation."""

import re
import tarfile

import pytest

from modeling_unimedi.report_processing_unimedi import (
    FINDINGS,
    IMPRESSION,
    clean_report,
    count_sentences,
    extract_sections,
    join_sections,
    openi_sections,
    prepare_reports,
    report_text,
    split_sentences,
)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def read_openi_xml(tgz) -> dict[str, str]:
    """Every Open-i report's XML text, read from the installed archive at test time (never copied to the repo)."""
    with tarfile.open(tgz) as archive:
        return {
            member.name: archive.extractfile(member).read().decode("utf-8")
            for member in archive.getmembers()
            if member.isfile() and member.name.endswith(".xml")
        }


@pytest.fixture(scope="module")
def openi_xml(openi_reports_tgz):
    return read_openi_xml(openi_reports_tgz)


# An independent reading of the XML: a regex over the raw text, no ElementTree, no shared helper.
_ABSTRACT_TEXT = re.compile(r'<AbstractText Label="(FINDINGS|IMPRESSION)"\s*>(.*?)</AbstractText>', re.DOTALL)


EMBEDDED_HEADER = re.compile(r"\b(?:FINDINGS|IMPRESSION)\s*:")


def regex_sections(xml: str) -> dict[str, str]:
    found = {"FINDINGS": "", "IMPRESSION": ""}
    for label, body in _ABSTRACT_TEXT.findall(xml):
        found[label] += body
    return found


def test_openi_non_empty_section_count_matches_independent_xml_count(openi_xml):
    assert len(openi_xml) > 3000  # the whole archive was read
    parsed = [openi_sections(xml) for xml in openi_xml.values()]
    independent = [regex_sections(xml) for xml in openi_xml.values()]
    with_text = sum(bool(s[FINDINGS] or s[IMPRESSION]) for s in parsed)
    expected = sum(bool(s["FINDINGS"].strip() or s["IMPRESSION"].strip()) for s in independent)
    assert with_text == expected
    for ours, label in ((FINDINGS, "FINDINGS"), (IMPRESSION, "IMPRESSION")):
        assert sum(bool(s[ours]) for s in parsed) == sum(bool(s[label].strip()) for s in independent)
    # the archive really has reports without findings, so "" for a missing section is exercised
    assert 0 < sum(bool(s[FINDINGS]) for s in parsed) < len(parsed)


@pytest.mark.parametrize(
    "layout",
    [
        "INDICATION: {indication}\nCOMPARISON: {comparison}\n\nFINDINGS: {findings}\n\nIMPRESSION: {impression}\n",
        "FINDINGS:\n\n {findings}\n \n IMPRESSION:\n\n {impression}\n",  # headers on their own line (MIMIC)
        "INDICATION: {indication} FINDINGS: {findings} IMPRESSION: {impression}",  # one line, upper case
        "Findings\n{findings}\nImpression\n{impression}",  # title-case headers alone on their line
    ],
)
def test_free_text_parser_recovers_real_openi_sections(openi_xml, layout):
    """Real report text laid out as MIMIC-style free text comes back section by section, whitespace-normalised.

    Skipped: the rare Open-i section that itself embeds a whole report with "FINDINGS:"/"IMPRESSION:" headers, which
    the free-text parser rightly splits there.
    """
    checked = 0
    for xml in openi_xml.values():
        sections = openi_sections(xml)
        if not (sections[FINDINGS] and sections[IMPRESSION]) or EMBEDDED_HEADER.search(" ".join(sections.values())):
            continue
        fields = {"indication": "Cough.", "comparison": "None.", **sections}
        assert extract_sections(layout.format(**fields)) == sections
        checked += 1
    assert checked > 1000


def test_mimic_report_sections_and_training_text():
    sections = extract_sections(MIMIC_REPORT)
    assert sections[FINDINGS].startswith("There is no focal consolidation")
    assert sections[FINDINGS].endswith("silhouette is normal.")
    assert "\n" not in sections[FINDINGS] and "  " not in sections[FINDINGS]
    assert sections[IMPRESSION] == "No acute cardiopulmonary process."
    text = report_text(MIMIC_REPORT)
    assert text == f"{sections[FINDINGS]} {sections[IMPRESSION]}"
    assert "INDICATION" not in text and "ascites" not in text and "FINDINGS" not in text
    assert count_sentences(text) == 4


@pytest.mark.parametrize(
    "report, findings, impression",
    [
        ("FINDINGS: Lungs clear. IMPRESSION: Normal chest.", "Lungs clear.", "Normal chest."),
        ("findings: Lungs clear.\nimpression: Normal.", "Lungs clear.", "Normal."),  # lower case at line start
        ("FINDINGS AND IMPRESSION: Small left effusion.", "", "Small left effusion."),
        ("FINDINGS/IMPRESSION:\nSmall left effusion.", "", "Small left effusion."),
        ("CONCLUSION: No change.", "", "No change."),
        ("IMPRESSION: No acute disease.", "", "No acute disease."),  # missing findings
        ("FINDINGS: Stable nodule.", "Stable nodule.", ""),  # missing impression
        ("INDICATION: cough.\nCOMPARISON: none.", "", ""),  # neither
        ("Heart size normal. Lungs clear.", "", ""),  # no headers at all
        ("FINDINGS: A.\nRECOMMENDATION(S): CT in 3 months.\nIMPRESSION: B.", "A.", "B."),  # unlisted header ends it
        ("FINDINGS: Left. FINDINGS: Right.", "Left. Right.", ""),  # repeated sections concatenate
        ("CHEST, TWO VIEWS: Lungs clear.\nIMPRESSION: Normal.", "Lungs clear.", "Normal."),  # view header = findings
        ("FINDINGS: The findings: stable. Impression: none.", "The findings: stable. Impression: none.", ""),
        ("FINDINGS:\nFindings are unchanged.", "Findings are unchanged.", ""),  # a sentence, not a header
    ],
)
def test_header_variants(report, findings, impression):
    assert extract_sections(report) == {FINDINGS: findings, IMPRESSION: impression}


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Compared to ___ radiograph, no change.", "Compared to radiograph, no change."),
        ("___F with new onset ascites", "F with new onset ascites"),
        ("Dr. ___ was paged at ___ (___).", "Dr. was paged at."),
        ("Normal chest x-XXXX. No XXXX of disease.", "Normal chest x. No of disease."),  # Open-i placeholders
        ("A ___-year-old man.", "A year-old man."),
        ("  Lungs\n\n are\tclear .  ", "Lungs are clear."),
        ("No evidence of metastatic disease. .", "No evidence of metastatic disease."),  # real Open-i text
        ("Stable , unchanged ;  no effusion", "Stable, unchanged; no effusion"),
        (". , Heart normal.", "Heart normal."),
        ("Heart\u00a0size normal\u0007.", "Heart size normal."),  # NBSP and a control character
        ("Nodule measures .5 cm and 2.5 cm.", "Nodule measures .5 cm and 2.5 cm."),  # decimals survive
        ("___ ___", ""),
    ],
)
def test_clean_report(raw, cleaned):
    assert clean_report(raw) == cleaned


def test_clean_report_is_idempotent_on_real_reports(openi_xml):
    for xml in list(openi_xml.values())[:500]:
        for text in openi_sections(xml).values():
            once = clean_report(text)
            assert clean_report(once) == once
            assert "XXXX" not in once and "  " not in once


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0),
        ("   ", 0),
        (". .", 0),
        ("Lungs clear", 1),  # no final period
        ("Lungs clear.", 1),
        ("Heart normal. Lungs clear. No effusion.", 3),
        ("A 2.5 cm nodule in the left upper lobe. It measured 1.8 cm before.", 2),  # decimals don't split
        ("Approx. 3 mm nodule. Compared with Dr. Smith's read vs. prior, unchanged.", 2),  # abbreviations
        ("Pleural disease, e.g. effusion, i.e. fluid. Resolved.", 2),  # initialisms
        ("1. Small effusion 2. No pneumothorax 3. Stable lines", 3),  # enumerated items without periods
        ("1. Small effusion. 2. No pneumothorax.", 2),
        ("Is there a pneumothorax? No! Lungs clear.", 3),
        ("The cardiac silhouette is\n normal. The lungs\n are clear.", 2),  # MIMIC line wrapping
        ('He said "stable." Lungs clear.', 2),  # closing quote after the period
        ("No acute disease. heart size is normal.", 2),  # real lower-case sentence start (Open-i)
    ],
)
def test_count_sentences(text, expected):
    assert count_sentences(text) == expected
    assert len(split_sentences(text)) == expected


def test_split_sentences_keeps_sentence_text():
    assert split_sentences("Approx. 2.5 cm nodule. 2. Stable.") == ["Approx. 2.5 cm nodule.", "Stable."]


def test_sections_without_final_period_do_not_merge():
    text = report_text("FINDINGS: Lungs clear\nIMPRESSION: Normal")
    assert text == "Lungs clear. Normal."
    assert count_sentences(text) == 2


def test_report_text_of_headerless_report_uses_whole_text():
    assert report_text("Bilateral ground-glass opacities.  ___ No effusion.") == (
        "Bilateral ground-glass opacities. No effusion."
    )


def test_join_sections_on_openi_report(openi_xml):
    xml = next(x for x in openi_xml.values() if "XXXX" in x and '<AbstractText Label="FINDINGS">' in x)
    sections = openi_sections(xml)
    text = join_sections(sections)
    assert "XXXX" not in text
    assert text.startswith(clean_report(sections[FINDINGS])) and text.endswith(clean_report(sections[IMPRESSION]))


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, message",
    [
        ("", "report is empty"),
        ("   \n\t ", "report is empty"),
        ("INDICATION: cough.\nCOMPARISON: none.", "no FINDINGS or IMPRESSION"),
        ("FINDINGS: ___\nIMPRESSION: ___", "no FINDINGS or IMPRESSION"),  # only de-identification tokens
    ],
)
def test_report_text_rejects_reports_without_text(report, message):
    with pytest.raises(ValueError, match=message):
        report_text(report)


def test_utf8_bytes_are_decoded_and_invalid_bytes_rejected():
    assert report_text("FINDINGS: Effusion \u2013 small.".encode()) == "Effusion \u2013 small."
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte 0xff at position 10"):
        report_text(b"FINDINGS: \xff\xfe small effusion")


@pytest.mark.parametrize("function", [clean_report, extract_sections, report_text, count_sentences])
@pytest.mark.parametrize("value", [None, 42, ["FINDINGS: a."], {"findings": "a"}])
def test_wrong_types_raise_type_error(function, value):
    with pytest.raises(TypeError, match="must be str or UTF-8 bytes, got"):
        function(value)


def test_malformed_openi_xml():
    with pytest.raises(ValueError, match=r"ecgen-radiology/7\.xml: not well-formed XML"):
        openi_sections("<eCitation><AbstractText Label='FINDINGS'>open", source="ecgen-radiology/7.xml")


def test_prepare_reports_validates_every_sample():
    assert prepare_reports(" Lungs  clear. ") == ["Lungs clear."]
    assert prepare_reports(["a ___ b", b"c"], clean=True) == ["a b", "c"]
    assert prepare_reports(["a  ___ b"], clean=False) == ["a  ___ b"]
    with pytest.raises(ValueError, match=r"text\[1\] is None"):
        prepare_reports(["ok", None])
    with pytest.raises(ValueError, match=r"text\[2\] is empty or whitespace-only"):
        prepare_reports(["ok", "fine", "  \n"])
    with pytest.raises(ValueError, match=r"text\[0\] is empty or whitespace-only after cleaning"):
        prepare_reports(["___"])
    with pytest.raises(ValueError, match=r"text\[1\] is not valid UTF-8"):
        prepare_reports(["ok", b"\xc3\x28"])
    with pytest.raises(TypeError, match=r"text\[0\] must be str or UTF-8 bytes, got int"):
        prepare_reports([3])
    with pytest.raises(TypeError, match="`text` must be a string or a list of strings, got dict"):
        prepare_reports({"a": "b"})
