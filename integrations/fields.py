"""Model fields encrypted at rest with Fernet.

Why our own fields: `django-fernet-fields` no longer imports on Django 5, and its successor
`django-fernet-encrypted-fields` hands back the ciphertext as if it were the value when the key
is wrong, and keeps per-form state on the shared field object. Here a value that no configured
key can decrypt raises `DecryptionError`, and the fields hold no state, so they are safe under
threads.

Keys come from `settings.FIELD_ENCRYPTION_KEYS`, newest first: the first encrypts, all of them
decrypt. To rotate, put a new key in front, run `manage.py rotate_encryption_keys`, then drop
the old key.
"""

import functools
import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import models


class DecryptionError(Exception):
    """A stored secret could not be decrypted with any configured key."""


@functools.lru_cache(maxsize=4)
def _multi_fernet(keys):
    if not keys:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS is empty: cannot encrypt or decrypt.")
    return MultiFernet([Fernet(key) for key in keys])


def _fernet():
    return _multi_fernet(tuple(settings.FIELD_ENCRYPTION_KEYS))


def encrypt(text):
    return _fernet().encrypt(text.encode()).decode()


def decrypt(token):
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "A stored secret could not be decrypted with any key in FIELD_ENCRYPTION_KEYS. "
            "Was a key removed before `manage.py rotate_encryption_keys` ran?"
        ) from None


class EncryptedTextField(models.TextField):
    """Text encrypted with Fernet. An empty string is stored as is: "not set" is no secret.

    Encrypted values can't be searched: every lookup but `isnull` raises instead of quietly
    never matching (each encryption of the same text differs).
    """

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return decrypt(value)

    def get_lookup(self, lookup_name):
        if lookup_name != "isnull":
            raise FieldError(f"{self.name} is encrypted and can't be filtered with {lookup_name}.")
        return super().get_lookup(lookup_name)


class EncryptedJSONField(EncryptedTextField):
    """A JSON value, encrypted as its text. Keys keep their order (an agent's arguments read
    back as it sent them)."""

    def get_prep_value(self, value):
        if value is None:
            return None
        return encrypt(json.dumps(value))

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        return json.loads(decrypt(value))

    def to_python(self, value):
        if isinstance(value, str):
            return json.loads(value)
        return value

    def value_to_string(self, obj):
        return json.dumps(self.value_from_object(obj))
