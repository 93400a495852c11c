import io
import threading

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import FieldError
from django.core.management import call_command
from django.db import connection

from integrations.fields import DecryptionError
from integrations.models import McpServer

URL = "https://mcp.example.com/v1/k-SECRETPATH-123"
TOKEN = "tok-VERYSECRET-456"


@pytest.fixture
def server(db):
    return McpServer.objects.create(
        name="s", url=URL, secret_token=TOKEN, headers={"X-Api-Key": "hdr-SECRET-789"}
    )


def raw_row(server):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT url, secret_token, headers FROM integrations_mcpserver WHERE id = %s",
            [server.pk],
        )
        return " ".join(cursor.fetchone())


def test_it_stores_secrets_encrypted(server):
    row = raw_row(server)
    for secret in ("SECRETPATH", "VERYSECRET", "hdr-SECRET", "mcp.example.com"):
        assert secret not in row


def test_it_reads_secrets_back(server):
    server = McpServer.objects.get(pk=server.pk)
    assert server.url == URL
    assert server.secret_token == TOKEN
    assert server.headers == {"X-Api-Key": "hdr-SECRET-789"}


def test_a_wrong_key_raises_instead_of_returning_ciphertext(server, settings):
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(DecryptionError, match="could not be decrypted"):
        McpServer.objects.get(pk=server.pk)


def test_a_missing_key_fails_loudly(server, settings):
    settings.FIELD_ENCRYPTION_KEYS = []
    with pytest.raises(Exception, match="FIELD_ENCRYPTION_KEYS is empty"):
        McpServer.objects.get(pk=server.pk)


def test_rotation_reencrypts_with_the_new_key(server, settings):
    old = settings.FIELD_ENCRYPTION_KEYS[0]
    new = Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [new, old]
    assert McpServer.objects.get(pk=server.pk).url == URL  # old rows stay readable
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    settings.FIELD_ENCRYPTION_KEYS = [new]  # the old key can now go
    server = McpServer.objects.get(pk=server.pk)
    assert (server.url, server.secret_token) == (URL, TOKEN)


def test_encrypted_fields_refuse_lookups_that_could_never_match(server):
    with pytest.raises(FieldError, match="encrypted"):
        McpServer.objects.filter(secret_token=TOKEN).count()


def test_empty_token_is_stored_as_empty(db):
    server = McpServer.objects.create(name="plain", url=URL)
    assert McpServer.objects.filter(pk=server.pk, secret_token__isnull=False).exists()
    assert McpServer.objects.get(pk=server.pk).secret_token == ""


def test_fields_are_safe_under_threads(transactional_db):
    """Many threads saving and reading different secrets never see each other's values."""
    servers = [
        McpServer.objects.create(name=f"t{i}", url=f"https://h{i}.example/{i}") for i in range(8)
    ]
    errors = []

    def worker(server):
        try:
            for round_ in range(10):
                token = f"token-{server.pk}-{round_}"
                McpServer.objects.filter(pk=server.pk).update(secret_token=token)
                assert McpServer.objects.get(pk=server.pk).secret_token == token
        except Exception as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
