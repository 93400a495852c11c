from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import transaction

from integrations.fields import EncryptedTextField


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret with the first key of FIELD_ENCRYPTION_KEYS. Run after "
        "putting a new key in front; afterwards the old keys can be removed."
    )

    def handle(self, *args, **options):
        for model in apps.get_models():
            fields = [f.name for f in model._meta.fields if isinstance(f, EncryptedTextField)]
            if not fields:
                continue
            count = 0
            for obj in model._default_manager.only("pk", *fields).iterator(chunk_size=500):
                # Reading decrypted with whichever key fits; writing encrypts with the first.
                with transaction.atomic():
                    model._default_manager.filter(pk=obj.pk).update(
                        **{name: getattr(obj, name) for name in fields}
                    )
                count += 1
            self.stdout.write(f"{model._meta.label}: re-encrypted {count} row(s).")
