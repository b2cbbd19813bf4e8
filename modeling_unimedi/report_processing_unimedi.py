"""Radiology report handling for UniMedI: section extraction, cleanup, sentence counting and input validation.

The processor runs every report it tokenises through `prepare_reports`; dataset preparation (MIMIC-CXR, BIMCV, Open-i
readers) turns raw reports into training text with `report_text` / `join_sections` and applies the paper's filter
"discard reports with fewer than three sentences" (§4.1) with `count_sentences(text) < MIN_REPORT_SENTENCES`.
Standard library only, so the file loads as Hub remote code anywhere.
"""

import re
import unicodedata
import xml.etree.ElementTree as ET

FINDINGS = "findings"
IMPRESSION = "impression"
OTHER_SECTION = "other"
MIN_REPORT_SENTENCES = 3  # paper §4.1: reports with fewer sentences are discarded from pretraining

# Header names normalised as in MIMIC-CXR's reference parser (MIT-LCP/mimic-cxr, txt/section_parser.py): a combined
# FINDINGS AND IMPRESSION section and a CONCLUSION count as the impression.
_SECTION_ALIASES = {
    "findings": FINDINGS,
    "finding": FINDINGS,
    "impression": IMPRESSION,
    "impressions": IMPRESSION,
    "conclusion": IMPRESSION,
    "conclusions": IMPRESSION,
    "findings and impression": IMPRESSION,
    "findings and impressions": IMPRESSION,
    "impression and findings": IMPRESSION,
    "findings/impression": IMPRESSION,
    "impression/findings": IMPRESSION,
}
# Other sections that end FINDINGS/IMPRESSION wherever they appear in upper case (MIMIC's most frequent headers).
_OTHER_SECTION_NAMES = (
    "examination", "exam", "type of examination", "indication", "indications", "clinical indication",
    "reason for exam", "reason for examination", "history", "clinical history", "clinical information",
    "patient history", "comparison", "comparisons", "comparison exam", "technique", "notification", "addendum",
    "recommendation", "recommendations", "recommendation(s)", "wet read", "comment", "comments",
)  # fmt: skip
# An unlisted header naming the view ("CHEST, TWO VIEWS:", "PA AND LATERAL VIEWS OF THE CHEST:") introduces findings,
# as in the reference parser.
_VIEW_HEADER = re.compile(r"\b(?:chest|portable|pa|ap|frontal|lateral|views?)\b")

_KNOWN_NAMES = sorted([*_SECTION_ALIASES, *_OTHER_SECTION_NAMES], key=len, reverse=True)
_KNOWN_PATTERN = "|".join(re.escape(name).replace(r"\ ", r"\s+") for name in _KNOWN_NAMES)
_KNOWN_UPPER_PATTERN = "|".join(re.escape(name.upper()).replace(r"\ ", r"\s+") for name in _KNOWN_NAMES)
_HEADER_PATTERNS = (
    # "Findings:" or "FINDINGS" alone on its line, any case, at the start of a line
    re.compile(rf"^[ \t]*(?P<name>{_KNOWN_PATTERN})[ \t]*(?::|$)", re.IGNORECASE | re.MULTILINE),
    # "... normal. IMPRESSION: ..." inside a line: upper case only, so ordinary words never split a section
    re.compile(rf"(?<![\w-])(?P<name>{_KNOWN_UPPER_PATTERN})[ \t]*:"),
    # any upper-case header at the start of a line, as MIMIC's parser reads them ("RECOMMENDATION(S):")
    re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE),
)

# De-identification placeholders: MIMIC's "___" and Open-i's "XXXX", with a hyphen that joined them to a word
# ("x-XXXX", "___-year-old").
_DEID_TOKEN = re.compile(r"(?:(?<=\w)-)?(?:_{2,}|\bX{4}\b)(?:-(?=\w))?")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?)\]])(?!\d)")
_PUNCTUATION_RUN = re.compile(r"[.,;:!?](?:\s*[.,;:!?])+")
_PUNCTUATION_STRENGTH = "?!.;:,"  # a run collapses to its first mark in this order: "disease. ." -> "disease."
_LEADING_PUNCTUATION = re.compile(r"^[\s.,;:!?)\]]+")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*$")

# Words whose trailing period does not end a sentence in radiology text (compared lower-cased, without the period).
_ABBREVIATIONS = frozenset(
    {"approx", "dr", "mr", "mrs", "ms", "vs", "cf", "fig", "figs", "resp", "incl", "st", "pt", "hx"}
)
_INITIALISM = re.compile(r"^(?:[A-Za-z]\.){2,}$")  # "e.g.", "i.e.", "a.m."
_LIST_NUMBER = re.compile(r"(?:^|(?<=\s))\d{1,2}\.(?=\s)")  # "1. ", "2. ": an enumerated item starts a sentence
# Unicode categories `clean_report` replaces: control characters (tabs, NUL, ...) by a space, format characters by "".
_INVISIBLE = {"Cc": " ", "Cf": ""}


def as_text(report: str | bytes, where: str = "report") -> str:
    """A report as `str`: bytes are decoded as strict UTF-8 so undecodable input fails loudly instead of silently, and
    a `str` holding a lone surrogate (not valid Unicode; the tokenizer cannot encode it) is refused."""
    if isinstance(report, str):
        try:
            report.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{where} holds a lone surrogate U+{ord(report[error.start]):04X} at position {error.start}, which is "
                "not valid Unicode text"
            ) from None
        return report
    if isinstance(report, (bytes, bytearray)):
        try:
            return bytes(report).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{where} is not valid UTF-8: byte 0x{report[error.start]:02x} at position {error.start}"
            ) from None
    raise TypeError(f"{where} must be str or UTF-8 bytes, got {type(report).__name__}")


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a letter, digit, punctuation mark or symbol: a report of only spaces or invisible
    characters (zero-width space, BOM, soft hyphen, combining marks) tokenises to nothing but [CLS] [SEP]."""
    return any(unicodedata.category(char)[0] in "LNPS" for char in text)


def clean_report(text: str | bytes) -> str:
    """Report text as the text encoder should see it.

    NFKC-normalises Unicode (non-breaking spaces, ligatures), drops control and invisible format characters
    (zero-width space, BOM, soft hyphen, direction marks) and de-identification
    placeholders (MIMIC's "___", Open-i's "XXXX") with the empty brackets they leave, collapses whitespace, removes
    spaces before punctuation, collapses runs of punctuation to the strongest mark ("disease. ." -> "disease."), and
    strips punctuation left at the start. Case is kept (BioClinicalBERT is cased). Returns "" when nothing is left.
    """
    text = unicodedata.normalize("NFKC", as_text(text))
    text = "".join(_INVISIBLE.get(unicodedata.category(char), char) for char in text)
    text = _EMPTY_BRACKETS.sub(" ", _DEID_TOKEN.sub(" ", text))
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", _collapse_whitespace(text))
    text = _PUNCTUATION_RUN.sub(_strongest_punctuation, text)
    return _LEADING_PUNCTUATION.sub("", text).strip()


def _strongest_punctuation(run: re.Match) -> str:
    return next(mark for mark in _PUNCTUATION_STRENGTH if mark in run.group())


def _canonical_section(header: str) -> str:
    name = re.sub(r"\s*/\s*", "/", _collapse_whitespace(header).lower())
    if name in _SECTION_ALIASES:
        return _SECTION_ALIASES[name]
    if name not in _OTHER_SECTION_NAMES and _VIEW_HEADER.search(name):
        return FINDINGS
    return OTHER_SECTION


def _find_headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, canonical section) of every header, first match winning where patterns overlap."""
    matches = sorted(
        (match.start(), -match.end(), match.group("name"))
        for pattern in _HEADER_PATTERNS
        for match in pattern.finditer(text)
    )
    headers, covered_until = [], -1
    for start, negative_end, name in matches:
        if start >= covered_until:
            headers.append((start, -negative_end, _canonical_section(name)))
            covered_until = -negative_end
    return headers


def _sections_of(text: str, headers: list[tuple[int, int, str]]) -> dict[str, str]:
    bodies = {FINDINGS: [], IMPRESSION: []}
    body_ends = [start for start, _, _ in headers[1:]] + [len(text)]
    for (_, body_start, section), body_end in zip(headers, body_ends):
        if section in bodies:
            bodies[section].append(text[body_start:body_end])
    return {section: _collapse_whitespace(" ".join(parts)) for section, parts in bodies.items()}


def extract_sections(report: str | bytes) -> dict[str, str]:
    """FINDINGS and IMPRESSION of a free-text report (MIMIC-CXR style), "" for an absent section.

    Headers are recognised at the start of a line in any case ("Findings:", or "FINDINGS" alone on its line), inside a
    line in upper case ("... IMPRESSION: ..."), and any other upper-case "HEADER:" at a line start ends the current
    section. "FINDINGS AND IMPRESSION" and "CONCLUSION" count as impression, view headers ("CHEST, TWO VIEWS:") as
    findings, following MIMIC-CXR's reference section parser; repeated sections are concatenated. The text is only
    whitespace-normalised: pass it through `clean_report` (or use `report_text`) before training.
    """
    text = as_text(report)
    return _sections_of(text, _find_headers(text))


def openi_sections(xml: str | bytes, source: str = "Open-i report") -> dict[str, str]:
    """FINDINGS and IMPRESSION of an Open-i (Indiana University) report, read from its `<AbstractText Label=...>`.

    `source` (e.g. the XML file's name) is what errors name.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise ValueError(f"{source}: not well-formed XML ({error})") from None
    bodies = {FINDINGS: [], IMPRESSION: []}
    for element in root.iter("AbstractText"):
        section = _SECTION_ALIASES.get((element.get("Label") or "").strip().lower())
        if section is not None:
            bodies[section].append("".join(element.itertext()))
    return {section: _collapse_whitespace(" ".join(parts)) for section, parts in bodies.items()}


def join_sections(sections: dict[str, str]) -> str:
    """The training text of a report: cleaned findings, then cleaned impression, each ending a sentence.

    Header words are left out: they carry no content and headerless sources (translated BIMCV reports) have none,
    so keeping them would mark X-ray and CT text apart. Raises ValueError when both sections are empty after cleaning.
    """
    parts = [clean_report(sections.get(name, "")) for name in (FINDINGS, IMPRESSION)]
    text = " ".join(_end_sentence(part) for part in parts if has_visible_text(part))
    if not text:
        raise ValueError("report has no FINDINGS or IMPRESSION text")
    return text


def _end_sentence(text: str) -> str:
    """Findings without a final period must not run into the impression's first sentence when counted."""
    return text if not text or _SENTENCE_END.search(text) else text + "."


def report_text(report: str | bytes) -> str:
    """Cleaned "findings impression" training text of a raw free-text report; raises ValueError if there is none.

    A report without any section header (free text, e.g. a translated BIMCV report) is used whole. A report with
    headers but no non-empty FINDINGS/IMPRESSION (only INDICATION, COMPARISON, ...) raises ValueError, as does an empty
    or whitespace-only report.
    """
    text = as_text(report)
    if not has_visible_text(text):
        raise ValueError("report is empty or has no visible characters")
    headers = _find_headers(text)
    return join_sections(_sections_of(text, headers) if headers else {FINDINGS: text})


def split_sentences(text: str | bytes) -> list[str]:
    """Sentences of a report, by the rule `count_sentences` documents."""
    sentences = []
    for item in _LIST_NUMBER.split(as_text(text)):
        words = item.split()
        start = 0
        for index, word in enumerate(words):
            if index == len(words) - 1 or _ends_sentence(word):
                sentences.append(" ".join(words[start : index + 1]))
                start = index + 1
    return [sentence for sentence in sentences if any(char.isalnum() for char in sentence)]


def _ends_sentence(word: str) -> bool:
    if not _SENTENCE_END.search(word):
        return False
    token = word.rstrip("\"')]")
    is_abbreviation = token.endswith(".") and (token[:-1].lower() in _ABBREVIATIONS or _INITIALISM.match(token))
    return not is_abbreviation


def count_sentences(text: str | bytes) -> int:
    """Number of sentences, for the paper's "fewer than three sentences" filter.

    Rule: a sentence ends at a word ending in ".", "!" or "?" (optionally followed by closing quotes/brackets), or at
    the end of the text; an enumerated item ("1. ", "2. ") also starts a new sentence. Not sentence ends: periods
    inside a word (decimals "2.5 cm"), known abbreviations ("approx.", "Dr.", "vs.") and initialisms ("e.g.",
    "i.e."). The next word's case is not consulted: real reports start sentences in lower case ("... clear. heart
    size is normal."). Pieces without any letter or digit (a stray ".") are not sentences. Line breaks are ignored,
    since MIMIC wraps sentences across lines.
    """
    return len(split_sentences(text))


def prepare_reports(reports, clean: bool = True) -> list[str]:
    """Validated report strings for tokenisation, one per sample, optionally cleaned with `clean_report`.

    Accepts one report or a list/tuple of them; each must be `str` or UTF-8 `bytes` (`as_text`). None, other types
    and reports without a visible character (empty, whitespace or invisible characters only; after cleaning, when
    `clean`) raise an error naming the sample.
    """
    if isinstance(reports, (str, bytes, bytearray)):
        reports = [reports]
    if not isinstance(reports, (list, tuple)):
        raise TypeError(f"`text` must be a string or a list of strings, got {type(reports).__name__}")
    if not reports:
        raise ValueError("`text` is an empty list: give one report per sample")
    texts = []
    for index, report in enumerate(reports):
        where = f"text[{index}]"
        if report is None:
            raise ValueError(f"{where} is None: every sample needs a report")
        text = as_text(report, where)
        text = clean_report(text) if clean else text
        if not has_visible_text(text):
            raise ValueError(
                f"{where} is empty or whitespace-only{' after cleaning' if clean else ''} (no visible character): "
                f"{report!r:.60}"
            )
        texts.append(text)
    return texts


__all__ = [
    "FINDINGS",
    "IMPRESSION",
    "MIN_REPORT_SENTENCES",
    "as_text",
    "clean_report",
    "count_sentences",
    "extract_sections",
    "has_visible_text",
    "join_sections",
    "openi_sections",
    "prepare_reports",
    "report_text",
    "split_sentences",
]
