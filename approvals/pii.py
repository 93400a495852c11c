"""Find personal data and secrets in the arguments of a tool call.

Before a tool call runs, an approver sees its arguments. This module points out values
that look like personal data or secrets, so that the approver notices, say, a customer's
card number or an API key on its way to a third-party server.

How it works:

* The arguments (any JSON value) are walked iteratively, never recursively, with bounds
  on depth, on the number of values and on the characters read per string and in total.
  Past a bound the rest is skipped, so huge input is fast but is not fully checked.
* Every string, and every dict key, is first read as a person would read it
  (`integrations.scanner.normalize`, the scanner's own normalisation): invisible characters
  such as zero-width spaces removed, Unicode NFKC (full-width at signs and digits, no-break
  spaces), look-alike letters and dashes folded, whitespace collapsed. Then it is matched
  against a fixed list of regular expressions, compiled once. Integers are checked as their
  digits (a card number may arrive as a number). Detectors run in priority order and a later
  match that overlaps an earlier one is dropped, so a card number is not also reported as a
  phone number.
* Obvious encodings are decoded and the result checked too, labelled as such: a
  percent-encoded string, and base64 or hex tokens of 16 or more characters that decode to
  readable UTF-8 text.
* The short values of one list or dict are also joined and checked together, so data split
  over several values ("4111", "1111", … or "alice", "@", "example.com") is reported at the
  container's path ("split across values").
* Candidates that carry a checksum are kept only when python-stdnum says it is valid: card
  numbers (Luhn, and a first digit used by card networks), IBANs (the country's length and
  format, and mod 97), US Social Security numbers (areas never issued, advertised samples),
  Spanish DNI and NIE numbers (check letter). UK National Insurance numbers have no checksum
  and no python-stdnum module: their letter rules stay a regular expression here.
* A dict key named like a secret (password, api_key, client_secret, ...) marks its
  non-empty string value as a secret, whatever the value looks like.
* Findings carry a masked preview, never the full value.

Kinds and what they match:

* email: addresses with a dotted domain (not "git@github.com:..." clone URLs, not
  "icon@2x.png"-style file names).
* phone: international numbers starting with + (8 to 15 digits); North American numbers
  written (555) 123-4567, 555-123-4567 or 555.123.4567; national numbers starting with 0
  and written in groups (020 7946 0958, 06-12345678), 10 or 11 digits. Plain runs of
  digits, dates and version numbers are not phone numbers.
* card_number: 13 to 19 digits, alone or grouped by spaces or dashes, Luhn-valid.
* iban: an IBAN in upper case, compact or in groups of four, mod-97 valid.
* national_id: US Social Security numbers written ddd-dd-dddd (not starting with 000,
  666 or 9, and not with 00 or 0000 groups); UK National Insurance numbers (AB123456C);
  Spanish DNI and NIE numbers with a valid check letter (12345678Z, X1234567L).
* secret: AWS access key IDs, GitHub, Slack, Stripe live, OpenAI / Anthropic style
  (sk-...) and Google (AIza...) keys, JSON Web Tokens, PEM private key blocks, passwords
  in URLs (scheme://user:password@host), secret assignments in text (DB_PASSWORD=...,
  "api_key": "...", ?access_token=...), and values of secret-named dict keys. A key is
  secret-named when its last word is password, secret, token, credentials, authorization
  and the like, or its last two are api_key, private_key, ...; pagination cursors
  (page_token, nextPageToken), counts (max_tokens) and placeholder values ("true",
  "********", "<your key>", "${VAR}") are not secrets. Unquoted lower-case assignments
  (token=get_token() in code) are left alone.

Limits: these are heuristics to draw an approver's attention (a finding makes the call wait
for a human where the server asks for it; no finding proves nothing). They are not data-loss
prevention and not a security boundary: other encodings, encryption, data split over several
nested values or spelled out in words get through; names, addresses, dates of birth, most
national ID formats and high-entropy secrets without a known prefix are not detected; and text
that only resembles a pattern can be flagged.
"""

import base64
import binascii
import bisect
import functools
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from stdnum import iban, luhn
from stdnum.es import dni, nie
from stdnum.us import ssn

from integrations.scanner import normalize

__all__ = ["find_personal_data"]

MAX_DEPTH = 64  # nesting levels visited
MAX_VALUES = 20_000  # dicts, lists and scalars visited
MAX_STRING_CHARS = 100_000  # characters read per string
MAX_TOTAL_CHARS = 1_000_000  # characters read in total
MAX_FINDINGS = 500
MASK = "****"


# --- Checks and previews ----------------------------------------------------------------


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _mask_all_but_last(text: str, keep: int) -> str:
    """Mask every letter and digit except the last `keep` ones; keep the layout."""
    remaining = sum(char.isalnum() for char in text) - keep
    masked = []
    for char in text:
        if char.isalnum() and remaining > 0:
            masked.append("*")
            remaining -= 1
        else:
            masked.append(char)
    return "".join(masked)


# --- Detectors --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Detector:
    kind: str
    label: str
    pattern: re.Pattern[str]
    preview: Callable[[re.Match[str]], str]
    accept: Callable[[re.Match[str]], bool] = lambda match: True


def _prefix_preview(match: re.Match[str]) -> str:
    return match.group("prefix") + MASK


def _card_accept(match: re.Match[str]) -> bool:
    digits = _digits(match.group())
    # Card networks use first digits 2 to 6; this leaves out millisecond timestamps and
    # 64-bit IDs (Discord, Twitter) that start with 1 and pass Luhn one time in ten.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits)


def _iban_accept(match: re.Match[str]) -> bool:
    # The country's own length and account-number format, and the mod-97 check digits.
    return iban.is_valid(match.group())


_FILE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "css", "js", "ts"})


def _email_accept(match: re.Match[str]) -> bool:
    domain = match.group("domain")
    if domain.rsplit(".", 1)[-1].lower() in _FILE_EXTENSIONS:
        return False
    after = match.string[match.end() : match.end() + 1]
    return not (match.group("local") == "git" and after == ":")  # git@github.com:owner/repo


def _phone_accept(match: re.Match[str]) -> bool:
    digits = _digits(match.group())
    if match.group().startswith("+"):
        return 8 <= len(digits) <= 15
    if match.group().startswith("0"):
        return 10 <= len(digits) <= 11
    return True


def _assignment_accept(match: re.Match[str]) -> bool:
    key = match.group("k1") or match.group("k2") or match.group("k3")
    value = match.group("v1") or match.group("v2") or match.group("v3")
    return _is_secret_key(key) and _looks_like_secret_value(value)


def _assignment_preview(match: re.Match[str]) -> str:
    return (match.group("k1") or match.group("k2") or match.group("k3")) + "=" + MASK


def _ascii(pattern: str) -> re.Pattern[str]:
    """Detectors see ASCII digits and letters only: \\d means 0-9, not other scripts' digits."""
    return re.compile(pattern, re.ASCII)


_NOT_AFTER = r"(?<![\w.+-])"  # start of a token
_NOT_BEFORE = r"(?![\w]|[.-]\d)"  # end of a token (a full stop may end the sentence)

# In priority order: a match overlapping an earlier detector's match is dropped.
_DETECTORS = (
    _Detector(
        "secret",
        "Private key (PEM)",
        _ascii(
            r"(?P<prefix>-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY( BLOCK)?-----)"
            r"(?:(?:[A-Za-z0-9+/=\s:,]|-(?!----)){0,10000}?-----END [A-Z0-9 ]{0,40}-----)?"
        ),
        lambda match: match.group("prefix") + " " + MASK,
    ),
    _Detector(
        "secret",
        "JSON Web Token",
        _ascii(r"\b(?P<prefix>eyJ)[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "Password in a URL",
        _ascii(r"\b(?P<prefix>[a-z][a-z0-9+.-]{1,15}://[^\s:/@]{1,64}:)[^\s/@]{1,128}@"),
        lambda match: match.group("prefix") + MASK + "@",
    ),
    _Detector(
        "secret",
        "AWS access key ID",
        _ascii(r"\b(?P<prefix>AKIA|ASIA)[0-9A-Z]{16}\b"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "GitHub token",
        _ascii(r"\b(?P<prefix>gh[pousr]_|github_pat_)[A-Za-z0-9_]{30,255}\b"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "Slack token",
        _ascii(r"\b(?P<prefix>xox[baprs]-)[A-Za-z0-9-]{10,255}"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "Stripe live key",
        _ascii(r"\b(?P<prefix>[sr]k_live_)[A-Za-z0-9]{10,255}\b"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "API key (sk-...)",
        _ascii(r"\b(?P<prefix>sk-(?:ant-|proj-)?)(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{20,255}"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "Google API key",
        _ascii(r"\b(?P<prefix>AIza)[\w-]{35}(?![\w-])"),
        _prefix_preview,
    ),
    _Detector(
        "secret",
        "Secret assigned in text",
        _ascii(
            # "api_key": "value", password='value', KEY = "value"
            r"(?<![\w.-])(?P<k1>[A-Za-z][\w.-]{0,63})[\"']?\s*[:=]\s*[\"']"
            r"(?P<v1>[^\s\"'<>{}$]{4,200})[\"']"
            # DB_PASSWORD=value (environment style: upper-case name)
            r"|(?<![\w.-])(?P<k2>[A-Z][A-Z0-9_]{0,63})=(?P<v2>[^\s\"'&;,<>{}$()]{4,200})"
            # ?access_token=value (query string)
            r"|[?&](?P<k3>[A-Za-z][\w.-]{0,63})=(?P<v3>[^\s\"'&;#,<>{}$()]{4,200})"
        ),
        _assignment_preview,
        _assignment_accept,
    ),
    _Detector(
        "iban",
        "IBAN (bank account)",
        _ascii(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w])"),
        lambda match: match.group()[:2] + "** " + MASK + " " + match.group().replace(" ", "")[-4:],
        _iban_accept,
    ),
    _Detector(
        "card_number",
        "Payment card number",
        _ascii(
            # Not preceded by another group of digits (the tail of an IBAN, say).
            r"(?<![\w.-])(?<!\d[ -])(?:\d{13,19}"
            r"|\d{4}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{1,3})?"
            r"|\d{4}(?P<amex>[ -])\d{6}(?P=amex)\d{4,5})"
            r"(?![\w]|[.-]\d|[ -]\d)"
        ),
        lambda match: "**** **** **** " + _digits(match.group())[-4:],
        _card_accept,
    ),
    _Detector(
        "national_id",
        "US Social Security number",
        _ascii(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w]|-\d)"),
        lambda match: "***-**-" + match.group()[-4:],
        lambda match: ssn.is_valid(match.group()),  # areas never issued, known fakes
    ),
    _Detector(
        "national_id",
        "UK National Insurance number",
        _ascii(
            r"(?<![\w])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w])"
        ),
        lambda match: _mask_all_but_last(match.group(), 3),
    ),
    _Detector(
        "national_id",
        "Spanish DNI/NIE number",
        _ascii(r"(?<![\w-])(?P<number>\d{8}|[XYZ]\d{7})-?(?P<letter>[A-Z])(?![\w])"),
        lambda match: _mask_all_but_last(match.group(), 3),
        lambda match: (dni if match.group()[0].isdigit() else nie).is_valid(match.group()),
    ),
    _Detector(
        "email",
        "E-mail address",
        _ascii(
            r"(?<![\w.%+-])(?P<local>[A-Za-z0-9._%+-]{1,64})@"
            r"(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24})"
            r"(?![\w-]|\.[A-Za-z0-9])"
        ),
        lambda match: match.group("local")[0] + "***@" + match.group("domain"),
        _email_accept,
    ),
    _Detector(
        "phone",
        "Phone number",
        _ascii(
            _NOT_AFTER + r"(?:"
            r"\+[1-9](?:[\s.()-]{0,2}\d){7,14}"  # +44 20 7946 0958, +1 (555) 123-4567
            r"|\([2-9]\d{2}\)\s?\d{3}[\s.-]\d{4}"  # (555) 123-4567
            r"|[2-9]\d{2}(?P<nanp>[.-])\d{3}(?P=nanp)\d{4}"  # 555-123-4567
            r"|0\d{1,4}(?:[ -]\d{2,8}){1,4}"  # 020 7946 0958, 06-12345678
            r")" + _NOT_BEFORE
        ),
        lambda match: _mask_all_but_last(match.group(), 2),
        _phone_accept,
    ),
)

# --- Secret-named keys ------------------------------------------------------------------

_SECRET_LAST_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "token",
        "apikey",
        "credentials",
        "credential",
        "authorization",
    }
)
_SECRET_KEY_PAIRS = frozenset(
    {"api_key", "access_key", "secret_key", "private_key", "ssh_key", "signing_key"}
)
# "page_token" and friends are pagination cursors, not secrets.
_NOT_SECRET_QUALIFIERS = frozenset(
    {"page", "next", "prev", "previous", "continuation", "sync", "cursor", "resume", "max"}
)
_PLACEHOLDER = re.compile(
    r"(?i)true|false|yes|no|null|none|undefined|[*\u2022x.#-]+|<[^>]*>|\$\{[^}]*\}|\{\{.*\}\}"
)


def _key_words(key: str) -> list[str]:
    """'x-apiKey' -> ['x', 'api', 'key']."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", key[:128])
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


def _is_secret_key(key: str) -> bool:
    words = _key_words(key)
    if not words:
        return False
    qualifier = words[-2] if len(words) > 1 else ""
    if words[-1] in _SECRET_LAST_WORDS:
        return qualifier not in _NOT_SECRET_QUALIFIERS
    return f"{qualifier}_{words[-1]}" in _SECRET_KEY_PAIRS


def _looks_like_secret_value(value: str) -> bool:
    value = value.strip()
    return bool(value) and not _PLACEHOLDER.fullmatch(value)


# --- Walking the value ------------------------------------------------------------------


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
    detector: _Detector
    text: str
    preview: str


class _Scan:
    """Findings in the order found, deduplicated, within the character budget."""

    def __init__(self) -> None:
        self.findings: list[dict] = []
        self._seen: set[tuple[str, str, str]] = set()
        self.chars_left = MAX_TOTAL_CHARS

    @property
    def done(self) -> bool:
        return self.chars_left <= 0 or len(self.findings) >= MAX_FINDINGS

    def matches(self, text: str) -> list[_Match]:
        """Matches in `text` as a person reads it (see `integrations.scanner.normalize`)."""
        return self.matches_normalized(normalize(text[: min(MAX_STRING_CHARS, self.chars_left)]))

    def matches_normalized(self, text: str) -> list[_Match]:
        text = text[: min(MAX_STRING_CHARS, self.chars_left)]
        self.chars_left -= len(text)
        if len(text) <= MAX_SPLIT_PART_CHARS:
            return list(_short_matches(text))
        return _matches(text)

    def add(self, match: _Match, path: str, how: str = "") -> None:
        detector = match.detector
        label = f"{detector.label} ({how})" if how else detector.label
        self._add(detector.kind, label, path, match.preview, match.text)

    def add_secret_field(self, key: str, path: str, value: str) -> None:
        label = f"Value of a secret field ({json.dumps(_display_key(key))})"
        self._add("secret", label, path, MASK, value)

    def _add(self, kind: str, label: str, path: str, preview: str, value: str) -> None:
        if (kind, path, value) in self._seen or len(self.findings) >= MAX_FINDINGS:
            return
        self._seen.add((kind, path, value))
        self.findings.append({"kind": kind, "label": label, "path": path, "preview": preview})


def _matches(text: str) -> list[_Match]:
    """Non-overlapping matches of all detectors, by position."""
    found: list[_Match] = []
    for detector in _DETECTORS:
        for match in detector.pattern.finditer(text):
            start, end = match.span()
            if any(start < other.end and other.start < end for other in found):
                continue
            if detector.accept(match):
                found.append(_Match(start, end, detector, match.group(), detector.preview(match)))
            if len(found) >= MAX_FINDINGS:
                break
    return sorted(found, key=lambda m: m.start)


def find_personal_data(value: object) -> list[dict]:
    """Personal data and secrets in a tool call's arguments (any JSON value).

    Returns findings {"kind", "label", "path", "preview"}, in document order, deduplicated;
    `path` is like "$.to" or "$.recipients[2]" and `preview` is masked.
    """
    scan = _Scan()
    # Stack entries: (value, path, depth, name of the secret-like key it sits under or "").
    stack: list[tuple[object, str, int, str]] = [(value, "$", 0, "")]
    values_left = MAX_VALUES
    while stack and values_left > 0 and not scan.done:
        node, path, depth, secret_key = stack.pop()
        values_left -= 1
        if isinstance(node, str):
            _scan_string(scan, node, path, secret_key)
        elif isinstance(node, int) and not isinstance(node, bool) and node.bit_length() <= 64:
            _scan_string(scan, str(node), path, "")
        elif isinstance(node, dict) and depth < MAX_DEPTH:
            _scan_split(scan, itertools.islice(node.values(), MAX_SPLIT_PARTS), path)
            stack.extend(reversed(_dict_children(scan, node, path, depth + 1)))
        elif isinstance(node, list | tuple) and depth < MAX_DEPTH:
            _scan_split(scan, itertools.islice(node, MAX_SPLIT_PARTS), path)
            children = itertools.islice(node, MAX_VALUES)
            stack.extend(
                reversed([(c, f"{path}[{i}]", depth + 1, "") for i, c in enumerate(children)])
            )
    return scan.findings


def _scan_string(scan: _Scan, text: str, path: str, secret_key: str) -> None:
    matches = scan.matches(text)
    for match in matches:
        scan.add(match, path)
    for decoded, how in itertools.islice(_decodings(text[:MAX_STRING_CHARS]), MAX_DECODINGS):
        for match in scan.matches(decoded):
            scan.add(match, path, how)
    typed_secret = any(match.detector.kind == "secret" for match in matches)
    if secret_key and not typed_secret and _looks_like_secret_value(text[:MAX_STRING_CHARS]):
        scan.add_secret_field(secret_key, path, text)


# --- Encoded and split values -----------------------------------------------------------

MAX_DECODINGS = 20  # encoded tokens decoded per string
MAX_SPLIT_PARTS = 1_000  # values of one list or dict joined to look for split-up data
MAX_SPLIT_PART_CHARS = 64  # longer values are text in their own right, not pieces
_BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){8,}")
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")


def _decodings(text: str):
    """(decoded text, how it was encoded) for the obvious encodings inside `text`: percent
    encoding, and base64 or hex tokens of 16+ characters that decode to readable text."""
    if _PERCENT.search(text):
        yield unquote(text), "percent-encoded"
    for token in _HEX_TOKEN.findall(text):
        decoded = _readable(binascii.unhexlify(token))
        if decoded:
            yield decoded, "hex-encoded"
    for token in _BASE64_TOKEN.findall(text):
        if _HEX_TOKEN.fullmatch(token):
            continue
        compact = token.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        decoded = _readable(raw)
        if decoded:
            yield decoded, "base64-encoded"


def _readable(raw: bytes) -> str | None:
    """`raw` as text if it is UTF-8 and nearly all printable (not random bytes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(char.isprintable() or char.isspace() for char in text)
    return text if text and printable >= 0.95 * len(text) else None


def _scan_split(scan: _Scan, values, path: str) -> None:
    """Data split over several values of one list or dict ("4111", "1111", … or "alice",
    "@", "example.com"): the values are joined, and what is found across two or more of them
    is reported at the container's path."""
    parts = [
        normalize(str(value))
        for value in values
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    ]
    if len(parts) < 2 or any(len(part) > MAX_SPLIT_PART_CHARS for part in parts):
        return
    # What one value holds by itself is reported at its own path already.
    found_kinds = {match.detector.kind for part in parts for match in _short_matches(part)}
    joined, starts, at = "".join(parts), [], 0
    for part in parts:
        starts.append(at)
        at += len(part)
    for match in scan.matches_normalized(joined):
        first = bisect.bisect_right(starts, match.start) - 1
        last = bisect.bisect_right(starts, match.end - 1) - 1
        if first != last and match.detector.kind not in found_kinds:
            found_kinds.add(match.detector.kind)
            scan.add(match, path, "split across values")


@functools.lru_cache(maxsize=4096)
def _short_matches(text: str) -> tuple[_Match, ...]:
    """`_matches` of a short value, remembered: its own scan as a child asks again."""
    return tuple(_matches(text))


def _dict_children(
    scan: _Scan, node: dict, path: str, depth: int
) -> list[tuple[object, str, int, str]]:
    children = []
    for key, child in itertools.islice(node.items(), MAX_VALUES):
        if not isinstance(key, str):
            children.append((child, f"{path}[?]", depth, ""))
            continue
        key_matches = scan.matches(key)
        child_path = _child_path(path, key, key_matches)
        for match in key_matches:
            scan.add(match, child_path)
        children.append((child, child_path, depth, key if _is_secret_key(key) else ""))
    return children


def _child_path(path: str, key: str, key_matches: list[_Match]) -> str:
    """ "$.to", or '$["first name"]'; a key that is itself personal data shows masked."""
    if key_matches:
        return f"{path}[{json.dumps(key_matches[0].preview)}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(_display_key(key))}]"


def _display_key(key: str) -> str:
    return key if len(key) <= 40 else key[:39] + "\u2026"
