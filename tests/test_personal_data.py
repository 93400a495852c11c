"""Tests for approvals.pii, personal data and secrets in tool-call arguments.

Plain pytest, no Django. The secrets below are made up; each is built from parts so that
no complete key-like literal sits in the source.
"""

import time

import hypothesis
import pytest
from hypothesis import strategies as st

from approvals.pii import find_personal_data


@pytest.fixture(autouse=True)
def _fast_mcp_timeouts():
    """Shadow conftest's autouse fixture of this name, which needs pytest-django's ``settings``:
    these tests use no Django at all, and run with ``-p no:django`` too."""


def kinds(findings: list[dict]) -> list[str]:
    return [finding["kind"] for finding in findings]


def only(value: object) -> dict:
    """The single finding in `value`."""
    findings = find_personal_data(value)
    assert len(findings) == 1, findings
    return findings[0]


# --- E-mail --------------------------------------------------------------------------------


def test_it_finds_an_email_address_and_masks_it():
    assert only({"to": "john.doe@example.com"}) == {
        "kind": "email",
        "label": "E-mail address",
        "path": "$.to",
        "preview": "j***@example.com",
    }


def test_it_gives_the_list_index_in_the_path():
    finding = only({"recipients": ["team", "ops", "jane@example.org"]})

    assert finding["path"] == "$.recipients[2]"


def test_it_finds_an_email_address_inside_text():
    finding = only({"body": "Please reply to ana.lopez+billing@corp.example.co.uk today."})

    assert finding["preview"] == "a***@corp.example.co.uk"


@pytest.mark.parametrize(
    "text",
    [
        "git@github.com:owner/repo.git",
        "icon@2x.png",
        "react@18.2.0",
        "user@localhost",
        "@mention in a comment",
    ],
)
def test_it_does_not_take_clone_urls_file_names_or_package_versions_for_emails(text):
    assert find_personal_data(text) == []


# --- Phone numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "preview"),
    [
        ("+44 20 7946 0958", "+** ** **** **58"),
        ("+1 (415) 555-0132", "+* (***) ***-**32"),
        ("+4915123456789", "+***********89"),
        ("(415) 555-0132", "(***) ***-**32"),
        ("415-555-0132", "***-***-**32"),
        ("415.555.0132", "***.***.**32"),
        ("020 7946 0958", "*** **** **58"),
        ("06-12345678", "**-******78"),
        ("01 23 45 67 89", "** ** ** ** 89"),
    ],
)
def test_it_finds_international_and_national_phone_numbers(text, preview):
    finding = only({"phone": f"Call me on {text}."})

    assert (finding["kind"], finding["preview"]) == ("phone", preview)


@pytest.mark.parametrize(
    "value",
    [
        42,
        "42",
        "2024-01-15",
        "15/01/2024",
        "01-02-2024",
        "2024-01-15T10:30:00+02:00",
        "v10.2.3",
        "1.2.3",
        "192.168.100.10",
        "10:30",
        "3.14159",
        "200 300 4000",
        "order 12345678",
        "UTC+0530",
    ],
)
def test_it_does_not_take_numbers_dates_or_versions_for_phone_numbers(value):
    assert find_personal_data({"value": value}) == []


# --- Cards -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["4242 4242 4242 4242", "4242-4242-4242-4242", "4242424242424242", "4000 0566 5566 5556"],
)
def test_it_finds_a_luhn_valid_card_number(number):
    finding = only({"card": number})

    assert finding == {
        "kind": "card_number",
        "label": "Payment card number",
        "path": "$.card",
        "preview": "**** **** **** " + number[-4:],
    }


def test_it_finds_an_american_express_number_grouped_4_6_5():
    assert kinds(find_personal_data("3782 822463 10005")) == ["card_number"]


def test_it_finds_a_card_number_given_as_an_integer():
    assert kinds(find_personal_data({"card": 4242424242424242})) == ["card_number"]


def test_it_ignores_a_card_like_number_that_fails_the_luhn_check():
    assert find_personal_data("4242 4242 4242 4241") == []


def test_it_ignores_long_ids_and_millisecond_timestamps_that_pass_luhn():
    # A 64-bit snowflake ID and a timestamp, both Luhn-valid, both starting with 1.
    assert find_personal_data({"id": "1156281376522715180", "at": 1700000000007}) == []


# --- IBAN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iban", "preview"),
    [
        ("DE89 3704 0044 0532 0130 00", "DE** **** 3000"),
        ("GB82WEST12345698765432", "GB** **** 5432"),
        ("FR14 2004 1010 0505 0001 3M02 606", "FR** **** 2606"),
    ],
)
def test_it_finds_a_valid_iban(iban, preview):
    finding = only({"account": iban})

    assert (finding["kind"], finding["preview"]) == ("iban", preview)


def test_it_ignores_an_iban_with_a_wrong_check_digit():
    assert find_personal_data("DE89 3704 0044 0532 0130 01") == []


# --- National IDs ----------------------------------------------------------------------------


def test_it_finds_a_us_social_security_number():
    assert only({"ssn": "123-45-6789"}) == {
        "kind": "national_id",
        "label": "US Social Security number",
        "path": "$.ssn",
        "preview": "***-**-6789",
    }


@pytest.mark.parametrize(
    "number", ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"]
)
def test_it_ignores_social_security_numbers_in_ranges_never_issued(number):
    assert find_personal_data(number) == []


@pytest.mark.parametrize("number", ["AB123456C", "AB 12 34 56 C"])
def test_it_finds_a_uk_national_insurance_number(number):
    finding = only({"nino": number})

    assert (finding["kind"], finding["label"]) == ("national_id", "UK National Insurance number")
    assert finding["preview"].endswith("56C") or finding["preview"].endswith("56 C")


@pytest.mark.parametrize("number", ["DA123456C", "GB123456A", "AB123456E"])
def test_it_ignores_national_insurance_numbers_with_invalid_letters(number):
    assert find_personal_data(number) == []


@pytest.mark.parametrize("number", ["12345678Z", "X1234567L"])
def test_it_finds_a_spanish_dni_or_nie_with_a_valid_check_letter(number):
    assert only(number)["label"] == "Spanish DNI/NIE number"


def test_it_ignores_a_spanish_dni_with_a_wrong_check_letter():
    assert find_personal_data("12345678A") == []


# --- Secrets -------------------------------------------------------------------------------

AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_" + "1a2b3c4d5e6f7g8h9i0jKLMNOPQRSTUVWXYZ"
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SLACK_TOKEN = "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE_KEY = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
OPENAI_KEY = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
ANTHROPIC_KEY = "sk-ant-" + "api03-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
GOOGLE_KEY = "AIza" + "SyA-1234567890abcdefghijklmnopqrstu"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEAx4\n-----END RSA PRIVATE KEY-----"

SECRETS = [
    (AWS_KEY, "AWS access key ID", "AKIA****"),
    (GITHUB_TOKEN, "GitHub token", "ghp_****"),
    (GITHUB_PAT, "GitHub token", "github_pat_****"),
    (SLACK_TOKEN, "Slack token", "xoxb-****"),
    (STRIPE_KEY, "Stripe live key", "sk_live_****"),
    (OPENAI_KEY, "API key (sk-...)", "sk-proj-****"),
    (ANTHROPIC_KEY, "API key (sk-...)", "sk-ant-****"),
    (GOOGLE_KEY, "Google API key", "AIza****"),
    (JWT, "JSON Web Token", "eyJ****"),
    (PEM, "Private key (PEM)", "-----BEGIN RSA PRIVATE KEY----- ****"),
]


@pytest.mark.parametrize(("secret", "label", "preview"), SECRETS, ids=lambda v: str(v)[:12])
def test_it_finds_a_known_secret_format(secret, label, preview):
    finding = only({"note": f"use {secret} for now"})

    assert finding == {"kind": "secret", "label": label, "path": "$.note", "preview": preview}


def test_it_finds_a_password_in_a_url():
    finding = only({"dsn": "postgres://app:s3cr3t-pw@db.internal:5432/app"})

    assert (finding["kind"], finding["preview"]) == ("secret", "postgres://app:****@")


@pytest.mark.parametrize(
    ("text", "preview"),
    [
        ("DB_PASSWORD=hunter22\nDEBUG=false", "DB_PASSWORD=****"),
        ('{"api_key": "abcd1234efgh"}', "api_key=****"),
        ("https://api.example.com/v1?access_token=abc123def456", "access_token=****"),
    ],
)
def test_it_finds_a_secret_assigned_in_text(text, preview):
    finding = only({"content": text})

    assert (finding["kind"], finding["preview"]) == ("secret", preview)


@pytest.mark.parametrize(
    "key",
    ["password", "PASSWORD", "db_password", "apiKey", "x-api-key", "client_secret", "token"],
)
def test_it_treats_the_value_of_a_secret_named_key_as_a_secret(key):
    assert only({key: "hunter2"}) == {
        "kind": "secret",
        "label": f'Value of a secret field ("{key}")',
        "path": f"$.{key}" if key.isidentifier() else f'$["{key}"]',
        "preview": "****",
    }


@pytest.mark.parametrize(
    "arguments",
    [
        {"next_page_token": "CAUQAA"},
        {"pageToken": "CAUQAA"},
        {"max_tokens": "1000"},
        {"token_count": "12"},
        {"password": ""},
        {"password": "   "},
        {"is_secret": "true"},
        {"password": "********"},
        {"api_key": "<your key here>"},
        {"secret_name": "prod-db"},
        {"key": "user-123"},
    ],
)
def test_it_ignores_pagination_tokens_counts_and_empty_or_placeholder_values(arguments):
    assert find_personal_data(arguments) == []


def test_it_reports_a_known_secret_under_a_secret_named_key_only_once():
    finding = only({"github_token": GITHUB_TOKEN})

    assert finding["label"] == "GitHub token"


# --- Paths, order and deduplication -------------------------------------------------------


def test_it_gives_the_path_through_nested_dicts_and_lists():
    value = {"batch": [{"contact": {"emails": ["x", "ana@example.com"]}}]}

    assert only(value)["path"] == "$.batch[0].contact.emails[1]"


def test_it_quotes_keys_that_are_not_identifiers_in_the_path():
    assert only({"first contact": "ana@example.com"})["path"] == '$["first contact"]'


def test_it_finds_personal_data_in_a_dict_key_and_masks_it_in_the_path():
    finding = only({"ana@example.com": {"role": "admin"}})

    assert finding["path"] == '$["a***@example.com"]'
    assert "ana@example.com" not in str(finding)


def test_it_reports_findings_in_document_order():
    value = {"b": "ana@example.com", "a": ["4242 4242 4242 4242", "+44 20 7946 0958"]}

    assert [(f["kind"], f["path"]) for f in find_personal_data(value)] == [
        ("email", "$.b"),
        ("card_number", "$.a[0]"),
        ("phone", "$.a[1]"),
    ]


def test_it_reports_the_same_value_at_the_same_path_once():
    assert len(find_personal_data("ana@example.com, cc ana@example.com")) == 1


def test_it_reports_different_values_at_the_same_path_separately():
    assert len(find_personal_data("ana@example.com, cc aaron@example.com")) == 2


def test_it_does_not_report_a_card_number_also_as_a_phone_number():
    assert kinds(find_personal_data("card 4242 4242 4242 4242 exp 12/27")) == ["card_number"]


ORDINARY_ARGUMENTS = [
    {
        "owner": "octocat",
        "repo": "hello-world",
        "title": "Crash on startup",
        "body": (
            "Steps: run `make run` on v2.3.1, see the traceback at 2024-05-01 10:22:33.\n"
            "Commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3, request "
            "550e8400-e29b-41d4-a716-446655440000. Total 1,234.56 EUR, build #123456789."
        ),
        "labels": ["bug", "p1"],
        "milestone": 3,
    },
    {"latitude": 52.52, "longitude": 13.405, "days": 7, "units": "metric"},
    {"path": "/home/user/projects/app/src/main.py", "head": 20},
    {"sql": "SELECT id FROM orders WHERE total > 1000 AND created_at > '2024-01-01' LIMIT 50"},
    {"content": "def main(token=None):\n    api_key = os.environ.get('API_KEY')\n"},
    {"requirements": "numpy==1.26.4\nscikit-learn==1.4.2\nsk-video==1.1.10"},
    {"isbn": "978-3-16-148410-0", "checksum": "sha256:e3b0c44298fc1c149afbf4c8996fb924"},
]


@pytest.mark.parametrize("arguments", ORDINARY_ARGUMENTS, ids=lambda a: next(iter(a)))
def test_it_finds_nothing_in_ordinary_tool_arguments(arguments):
    assert find_personal_data(arguments) == []


@pytest.mark.parametrize("value", [None, True, False, 0, 3.5, "", [], {}, "hello world"])
def test_it_finds_nothing_in_plain_values(value):
    assert find_personal_data(value) == []


# --- Bounds -------------------------------------------------------------------------------


def test_it_reads_a_5_mb_string_quickly():
    started = time.perf_counter()

    findings = find_personal_data({"blob": "ana@example.com " + "a" * 5_000_000})

    assert time.perf_counter() - started < 5
    assert kinds(findings) == ["email"]


def test_it_survives_dicts_nested_10000_levels_deep():
    value: dict = {}
    inner = value
    for _ in range(10_000):
        inner["next"] = {}
        inner = inner["next"]
    inner["email"] = "ana@example.com"

    assert find_personal_data(value) == []  # beyond the depth bound: not read, no crash


def test_it_survives_lists_nested_10000_levels_deep():
    value: list = []
    inner = value
    for _ in range(10_000):
        inner.append([])
        inner = inner[0]

    assert find_personal_data(value) == []


def test_it_reads_a_million_element_list_quickly_and_caps_the_findings():
    started = time.perf_counter()

    findings = find_personal_data(["ana@example.com"] * 1_000_000)

    assert time.perf_counter() - started < 5
    assert 0 < len(findings) <= 500


def test_it_skips_integers_too_large_to_be_card_numbers():
    assert find_personal_data(10**5000) == []


# --- Properties ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=40,
)


@hypothesis.settings(deadline=None)
@hypothesis.given(value=JSON)
def test_it_never_raises_and_returns_well_formed_findings(value):
    findings = find_personal_data(value)

    for finding in findings:
        assert set(finding) == {"kind", "label", "path", "preview"}
        assert finding["path"].startswith("$")
    assert findings == find_personal_data(value)


def with_luhn_digit(digits: str) -> str:
    for check in "0123456789":
        total = 0
        for position, char in enumerate(reversed(digits + check)):
            value = int(char) * (2 if position % 2 else 1)
            total += value - 9 if value > 9 else value
        if total % 10 == 0:
            return digits + check
    raise AssertionError("unreachable")


CARD_NUMBERS = st.builds(
    lambda first, rest: with_luhn_digit(first + rest),
    st.sampled_from("23456"),
    st.text(alphabet="0123456789", min_size=14, max_size=14),
)


@hypothesis.settings(deadline=None)
@hypothesis.given(number=CARD_NUMBERS, separator=st.sampled_from(["", " ", "-"]))
def test_card_previews_never_contain_the_full_number(number, separator):
    grouped = separator.join(number[i : i + 4] for i in range(0, 16, 4))

    findings = find_personal_data({"text": f"card: {grouped}"})

    assert kinds(findings) == ["card_number"]
    assert number not in findings[0]["preview"].replace(" ", "")
    assert grouped not in findings[0]["preview"]


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
SECRET_VALUES = st.one_of(
    st.text(alphabet=ALNUM[:26] + ALNUM[52:], min_size=16, max_size=16).map(lambda s: "AKIA" + s),
    st.text(alphabet=ALNUM, min_size=36, max_size=36).map(lambda s: "ghp_" + s),
    st.text(alphabet=ALNUM, min_size=24, max_size=40).map(lambda s: "sk_live_" + s),
    st.text(alphabet=ALNUM, min_size=30, max_size=40).map(lambda s: "sk-proj-a1" + s),
    st.text(alphabet=ALNUM, min_size=20, max_size=30).map(lambda s: "xoxb-" + s),
    st.text(alphabet=ALNUM + "_-", min_size=35, max_size=35).map(lambda s: "AIza" + s),
    # Any other value counts under a "password" key ("pw" keeps it from reading as "true").
    st.text(alphabet=ALNUM + "!#%^", max_size=30).map(lambda s: "pw" + s),
)


@hypothesis.settings(deadline=None)
@hypothesis.given(secret=SECRET_VALUES)
def test_secret_previews_never_contain_the_secret(secret):
    findings = find_personal_data({"password": secret, "note": f"key {secret} end"})

    assert findings
    assert "secret" in kinds(findings)
    for finding in findings:
        assert secret not in finding["preview"]


# --- Evasions: invisible characters, compatibility forms, encodings, split values (issue 9) ---


@pytest.mark.parametrize(
    "value, kind",
    [
        ("ali\u200bce@exam\u200dple.com", "email"),  # zero-width space and joiner
        ("alice\uff20example.com", "email"),  # full-width commercial at
        ("4111\u00a01111\u00a01111\u00a01111", "card_number"),  # no-break spaces
        ("\uff14\uff11\uff11\uff11 1111 1111 1111", "card_number"),  # full-width digits
        ("4111\u20111111\u20111111\u20111111", "card_number"),  # non-breaking hyphens
        ("078\u200b-05-1121", "national_id"),
    ],
)
def test_it_sees_through_invisible_characters_and_look_alike_forms(value, kind):
    assert kinds(find_personal_data({"note": value})) == [kind]


@pytest.mark.parametrize(
    "encoded, how",
    [
        ("YWxpY2UubG9wZXpAZXhhbXBsZS5jb20=", "base64-encoded"),  # alice.lopez@example.com
        ("YWxpY2UubG9wZXpAZXhhbXBsZS5jb20", "base64-encoded"),  # without padding
        ("see: YWxpY2UubG9wZXpAZXhhbXBsZS5jb20= thanks", "base64-encoded"),
        ("616c6963652e6c6f70657a406578616d706c652e636f6d", "hex-encoded"),
        ("to=alice.lopez%40example.com", "percent-encoded"),
    ],
)
def test_it_decodes_obvious_encodings(encoded, how):
    finding = only({"blob": encoded})
    assert finding["kind"] == "email"
    assert finding["label"] == f"E-mail address ({how})"
    assert finding["preview"] == "a***@example.com"


def test_it_finds_a_card_number_in_base64():
    import base64

    blob = base64.b64encode(b"card: 4111 1111 1111 1111, exp 12/30").decode()
    assert kinds(find_personal_data({"payload": blob})) == ["card_number"]


@pytest.mark.parametrize(
    "value, path, kind",
    [
        ({"card": ["4111", "1111", "1111", "1111"]}, "$.card", "card_number"),
        ({"to": {"user": "alice.lopez", "at": "@", "domain": "example.com"}}, "$.to", "email"),
        ({"ssn": ["078", "05", "1121"]}, "$.ssn", None),  # joined as 078051121: no format
        ({"digits": [4111, 1111, 1111, 1111]}, "$.digits", "card_number"),
    ],
)
def test_it_finds_data_split_across_values(value, path, kind):
    findings = find_personal_data(value)
    if kind is None:
        assert findings == []
        return
    [finding] = findings
    assert (finding["kind"], finding["path"]) == (kind, path)
    assert finding["label"].endswith("(split across values)")


@pytest.mark.parametrize(
    "value",
    [
        ["team", "ops", "lead"],
        {"first": "Ada", "last": "Lovelace"},
        ["2024", "01", "15"],
        "dGhpcyBpcyBqdXN0IGEgc2VudGVuY2Uu",  # "this is just a sentence."
        "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",  # a SHA-256 digest: random bytes
        "deadbeefcafebabe0123456789abcdef",  # hex of random bytes
        "encodeURIComponent%20works",
    ],
)
def test_encodings_and_joins_of_ordinary_values_find_nothing(value):
    assert find_personal_data({"x": value}) == []


# --- Checksums and national numbers by python-stdnum ------------------------------------------


def test_an_iban_must_have_its_countrys_length_and_format():
    assert kinds(find_personal_data({"a": "GB82WEST12345698765432"})) == ["iban"]
    # Check digits right for the digits given, but one character short for a British IBAN.
    assert find_personal_data({"a": "GB61WEST1234569876543"}) == []


def test_an_advertised_sample_social_security_number_is_not_reported():
    assert find_personal_data({"ssn": "078-05-1120"}) == []  # Woolworth's wallet card
    assert kinds(find_personal_data({"ssn": "078-05-1121"})) == ["national_id"]


def test_a_spanish_nie_is_checked_by_its_own_rule():
    assert kinds(find_personal_data({"id": "X1234567L"})) == ["national_id"]
    assert find_personal_data({"id": "X1234567A"}) == []
