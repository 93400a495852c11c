"""The hot path's statements, their SQL built by the ORM once per connection (issue 11).

Django builds and compiles a statement's SQL anew at every run. For the four statements of an
auto-approved call that an agent waits for (the agent, the tool with its server, the INSERT,
the result's UPDATE) that was ~2.3 ms of the web process's CPU on SQLite, against ~0.4 ms for
the database to run them (docs/architecture.md, "The hot path's SQL"); the MCP endpoint's
re-attach lookup is built here too. The ORM still writes each statement, from an ordinary
queryset, UPDATE or model INSERT, but once per database connection; each run then only
prepares its values and reads its rows, with the ORM's own methods:

- values go through the fields' own `get_db_prep_value` / `get_db_prep_save` (so arguments and
  secrets are encrypted, JSON encoded, datetimes adapted exactly as by the ORM);
- rows become instances through the compiler's converters (decryption, JSON, SQLite
  datetimes), `Model.from_db` and the populators of `select_related`, as `QuerySet` does;
- every run reads and writes the current rows: only SQL text is kept, never a row.

Where a value goes is found with markers: a filter gets a sentinel value of its field's type
(so the SQL is the ORM's very text), found among the compiled parameters; an INSERT's VALUES
and an UPDATE's SET get a `_Slot` expression, compiled to `%s` with itself as the parameter
(an encrypted field's sentinel could not be found again: each encryption differs).

This leans on Django internals that `QuerySet` itself uses (`SQLCompiler.as_sql`, `select`,
`klass_info`, `get_converters`, `apply_converters`, `get_related_populators`); each shape not
handled here raises when the statement is first compiled. tests/test_hot_path.py pins that
these statements give what the ORM gives, field by field, on SQLite and PostgreSQL.

On PostgreSQL they are also prepared on the server, once per connection (`_cursor`): Django's
cursors bind values on the client, so the server parses and plans each run's SQL anew, and
planning the tool's lookup (four joined tables and a subquery) took ~0.5 ms of its ~0.8 ms.
"""

import itertools
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models.expressions import Expression
from django.db.models.query import ModelIterable, get_related_populators
from django.db.models.signals import post_save, pre_save
from django.db.models.sql import InsertQuery, UpdateQuery
from django.db.models.sql.compiler import SQLInsertCompiler
from psycopg.errors import FeatureNotSupported, InvalidSqlStatementName
from psycopg.pq import TransactionStatus


def _cursor(connection):
    """Django's cursor (its error wrapping, its query log); on PostgreSQL, unless
    DATABASE_PREPARED_STATEMENTS is off, one whose statements are bound and prepared on the
    server (`_Prepared`)."""
    cursor = connection.cursor()
    if connection.vendor == "postgresql" and settings.DATABASE_PREPARED_STATEMENTS:
        from django.db.backends.postgresql.base import TIMESTAMPTZ_OID, ServerBindingCursor
        from django.db.backends.postgresql.psycopg_any import register_tzloader
        from psycopg.pq import Format

        # Django's own server-binding cursor class (its `server_side_binding` option), on the
        # connection Django's cursor was made for, with the time zone Django's
        # `create_cursor` gives a cursor.
        raw = ServerBindingCursor(connection.connection)
        tzloader = connection.connection.adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT)
        if connection.timezone != tzloader.timezone:
            register_tzloader(connection.timezone, raw)
        cursor.cursor.close()
        cursor.cursor = _Prepared(raw)
    return cursor


class _Prepared:
    """A psycopg cursor whose `execute` prepares its statement on the server the first time
    this connection runs it, and runs it prepared afterwards (psycopg keeps a connection's
    prepared statements, the 100 most used). Django turns psycopg's preparing off for every
    connection (`prepare_threshold` None, for connection poolers), and not every SQL the ORM
    writes can be prepared (Django #20516): it is turned on for these statements only, while
    they run. Everything else goes to the psycopg cursor as it is."""

    def __init__(self, cursor):
        self._cursor, self._sql = cursor, None

    @property
    def _query(self):
        """What Django's query log reads (`last_executed_query`: with DEBUG, or a test's count
        of queries): here the statement without its values, which go to the server apart."""
        return _Logged(self._sql.encode()) if self._sql is not None else None

    def execute(self, sql, params=None):
        self._sql = sql
        connection = self._cursor.connection
        threshold, connection.prepare_threshold = connection.prepare_threshold, 0
        try:
            try:
                return self._cursor.execute(sql, params, prepare=True)
            except (FeatureNotSupported, InvalidSqlStatementName):
                if not _forget_prepared(connection):
                    raise
                return self._cursor.execute(sql, params, prepare=True)
        finally:
            connection.prepare_threshold = threshold

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def __iter__(self):
        return iter(self._cursor)


def _forget_prepared(connection):
    """After a prepared statement failed before it ran: "cached plan must not change result
    type" (a migration changed a selected column's type, even a CharField's max_length) or
    "does not exist" (a pooler, a DISCARD ALL). psycopg keeps such a statement and would run
    it, and fail, on every call until the connection closes (with a pool: its max_lifetime,
    an hour). Forget this connection's statements on both sides; True if that is done and the
    statement may run again now (outside a transaction, the failed one changed nothing). In a failed
    transaction the deallocation waits for its rollback, and the error goes up."""
    connection._prepared.clear()
    if connection.info.transaction_status != TransactionStatus.IDLE:
        return False
    connection.wait(connection._prepared.maintain_gen(connection))
    return True


@dataclass
class _Logged:
    query: bytes


class _PerConnection:
    """What a statement compiled for each connection. Django's connections are per thread, and
    so is this (no lock); a connection object replaced (tests' settings) compiles anew."""

    def __init__(self):
        self._local = threading.local()

    def for_connection(self, connection, compile):
        compiled = getattr(self._local, connection.alias, None)
        if compiled is None or compiled.connection is not connection:
            compiled = compile(connection)
            setattr(self._local, connection.alias, compiled)
        return compiled


# Filters ---------------------------------------------------------------------------------------

_serial = itertools.count(1)


def _sentinel(field):
    """A value of `field`'s type that no filter of the hot path would ever hold."""
    n = next(_serial)
    kind = field.get_internal_type()
    if kind in ("CharField", "TextField"):
        return f"\ufdd0sentinel {n}\ufdd0"  # a noncharacter: in no name or token
    if kind in ("AutoField", "BigAutoField", "IntegerField", "BigIntegerField"):
        return -907_000_000 - n
    if kind == "DateTimeField":
        return datetime(1901, 2, 3, 4, 5, 6, n % 1_000_000, tzinfo=UTC) + timedelta(days=n)
    raise TypeError(f"No sentinel for a {kind} ({field}): give its filter a constant.")


class _Filters:
    """The values of a statement's filters: a sentinel for each at compile time, found among
    the compiled parameters; at each run, the value prepared by its field as the lookup would
    (`get_db_prep_value`: exact, in, gt/lt and their kind prepare their values so)."""

    def __init__(self, fields):
        self.fields = fields  # name -> the model field whose lookup takes the value
        self.sentinels = {}

    def sentinel(self, name, many=0):
        """The sentinel for `name` (the same one wherever the value goes), or a list of `many`
        for an `__in` filter."""
        if name not in self.sentinels:
            field = self.fields[name]
            many_of = [_sentinel(field) for _ in range(many)]
            self.sentinels[name] = many_of if many else _sentinel(field)
        return self.sentinels[name]

    def slots(self, params, connection):
        """{name: [(index of a sentinel among `params`, which of its list)]}; every sentinel
        must be there, as a parameter of its own."""
        found = {}
        for name, values in self.sentinels.items():
            field = self.fields[name]
            listed = values if isinstance(values, list) else [values]
            for which, value in enumerate(listed):
                prepared = field.get_db_prep_value(value, connection, prepared=False)
                at = [i for i, param in enumerate(params) if _same(param, prepared)]
                if not at:
                    raise ValueError(f"The filter on {name} is not a parameter of the SQL.")
                places = [(i, which if listed is values else None) for i in at]
                found.setdefault(name, []).extend(places)
        return found

    def fill(self, params, slots, values, connection):
        for name, places in slots.items():
            value, field = values[name], self.fields[name]
            for index, which in places:
                item = value if which is None else value[which]
                if item is None:
                    raise TypeError(f"{name}: None is not a value here (the ORM would say IS NULL)")
                params[index] = field.get_db_prep_value(item, connection, prepared=False)


def _same(param, prepared):
    return type(param) is type(prepared) and param == prepared


# SELECT ----------------------------------------------------------------------------------------


class Query:
    """A queryset whose SQL is compiled once per connection: `build(filters)` returns it, with
    `filters.sentinel(name)` wherever a value of `fields[name]` goes; `rows(**values)` runs it
    with those values and returns the model instances, as iterating the queryset would."""

    def __init__(self, build, **fields):
        self.build, self.fields, self.model = build, fields, None
        self._compiled = _PerConnection()

    def rows(self, **values):
        if self.model is None:
            self.model = self.build(_Filters(self.fields)).model
        alias = router.db_for_read(self.model)
        connection = connections[alias]
        compiled = self._compiled.for_connection(connection, self._compile)
        params = list(compiled.params)
        compiled.filters.fill(params, compiled.slots, values, connection)
        with _cursor(connection) as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchall()
        return compiled.instances(rows)

    def _compile(self, connection):
        filters = _Filters(self.fields)
        queryset = self.build(filters)
        if (
            queryset._iterable_class is not ModelIterable
            or queryset._prefetch_related_lookups
            or queryset._known_related_objects
        ):
            raise ValueError("Only a plain queryset of instances (select_related, annotate).")
        compiler = queryset.query.get_compiler(connection=connection)
        sql, params = compiler.as_sql()
        return _CompiledQuery(connection, compiler, sql, params, filters)


class _CompiledQuery:
    def __init__(self, connection, compiler, sql, params, filters):
        self.connection, self.compiler, self.sql, self.params = connection, compiler, sql, params
        self.filters, self.slots = filters, filters.slots(params, connection)
        select, klass_info = compiler.select, compiler.klass_info
        self.model = klass_info["model"]
        fields = klass_info["select_fields"]
        self.start, self.end = fields[0], fields[-1] + 1
        self.init_list = [column[0].target.attname for column in select[self.start : self.end]]
        self.populators = get_related_populators(klass_info, select, connection.alias)
        self.annotations = compiler.annotation_col_map
        expressions = [column[0] for column in select[: compiler.col_count]]
        if compiler.has_composite_fields(expressions):
            raise ValueError("Composite fields are not handled here.")
        self.converters = compiler.get_converters(expressions)
        self.col_count = compiler.col_count if compiler.has_extra_select else None

    def instances(self, rows):
        """What `ModelIterable` makes of the rows (`QuerySet.__iter__`)."""
        if self.col_count is not None:
            rows = [row[: self.col_count] for row in rows]
        if self.converters:
            rows = self.compiler.apply_converters(rows, self.converters)
        alias, instances = self.connection.alias, []
        for row in rows:
            obj = self.model.from_db(alias, self.init_list, row[self.start : self.end])
            for populator in self.populators:
                populator.populate(row, obj)
            for name, position in self.annotations.items():
                setattr(obj, name, row[position])
            instances.append(obj)
        return instances


# INSERT and UPDATE -----------------------------------------------------------------------------


class _Slot(Expression):
    """Where a value of an INSERT or UPDATE goes: `%s`, with the slot itself as the parameter,
    replaced at each run by the value the field prepares for saving (`get_db_prep_save`)."""

    def __init__(self, field, name=""):
        super().__init__(output_field=field)
        self.target, self.name = field, name

    def as_sql(self, compiler, connection):
        return "%s", [self]


def _saved_value(field, value, connection):
    """`value` as the ORM's UPDATE and INSERT compilers prepare it for `field`."""
    if hasattr(value, "resolve_expression"):
        raise TypeError(f"{field.name}: expressions go through the ORM, not here.")
    if hasattr(value, "prepare_database_save"):
        if not field.remote_field:
            raise TypeError(f"{field.name}: a model instance for a field that is no relation.")
        value = value.prepare_database_save(field)
    return field.get_db_prep_save(value, connection=connection)


def _check_placeholders(fields):
    for field in fields:
        if hasattr(field, "get_placeholder"):
            raise ValueError(f"{field}: a field with its own placeholder is not handled here.")


_updates = {}  # (model, filters' shape, fields set) -> its _Update; a few per process
_updates_lock = threading.Lock()


def update(model, filters, **values):
    """`model._base_manager.filter(**filters).update(**values)`: the rows changed. The filters
    are on the model's own columns (`pk`, `status__in`, `expires_at__gt`, …), with plain
    values; the values are plain too (no F() or other expressions)."""
    shape = tuple(
        (name, len(value) if isinstance(value, list | tuple) else None)
        for name, value in filters.items()
    )
    if any(many == 0 for _, many in shape):
        return 0  # `__in=[]`: the ORM sends no query either
    key = (model, shape, tuple(values))
    statement = _updates.get(key)
    if statement is None:
        with _updates_lock:
            statement = _updates.setdefault(key, _Update(model, shape, tuple(values)))
    return statement.run(filters, values)


class _Update:
    def __init__(self, model, shape, names):
        self.model, self.shape, self.names = model, shape, names
        meta = model._meta
        self.fields = {name: meta.pk if name == "pk" else meta.get_field(name) for name in names}
        _check_placeholders(self.fields.values())
        self.filter_fields = {}
        for name, _ in shape:
            column, _, lookup = name.partition("__")
            field = meta.pk if column == "pk" else meta.get_field(column)
            if field.is_relation or lookup not in ("", "exact", "in", "gt", "gte", "lt", "lte"):
                raise ValueError(f"{name}: only plain lookups on the model's own columns.")
            self.filter_fields[name] = field
        self._compiled = _PerConnection()

    def run(self, filters, values):
        alias = router.db_for_write(self.model)
        connection = connections[alias]
        compiled = self._compiled.for_connection(connection, self._compile)
        params = list(compiled.params)
        compiled.filters.fill(params, compiled.slots, filters, connection)
        for index, name in compiled.set_slots:
            params[index] = _saved_value(self.fields[name], values[name], connection)
        rollback_on_error = transaction.mark_for_rollback_on_error(using=alias)
        with rollback_on_error, _cursor(connection) as cursor:
            cursor.execute(compiled.sql, params)
            return cursor.rowcount

    def _compile(self, connection):
        filters = _Filters(self.filter_fields)
        sentinels = {name: filters.sentinel(name, many or 0) for name, many in self.shape}
        query = self.model._base_manager.filter(**sentinels).query.chain(UpdateQuery)
        query.add_update_values({name: _Slot(field, name) for name, field in self.fields.items()})
        query.clear_select_clause()
        compiler = query.get_compiler(connection=connection)
        sql, params = compiler.as_sql()
        if query.related_updates:
            raise ValueError("Updates of parent models are not handled here.")
        return _CompiledUpdate(connection, sql, params, filters)


class _CompiledUpdate:
    def __init__(self, connection, sql, params, filters):
        self.connection, self.sql = connection, sql
        self.set_slots = [(i, p.name) for i, p in enumerate(params) if isinstance(p, _Slot)]
        self.params = [None if isinstance(p, _Slot) else p for p in params]
        self.filters, self.slots = filters, filters.slots(self.params, connection)


_inserts = {}  # model -> its _Insert
_inserts_lock = threading.Lock()


def insert(obj):
    """`obj.save()` for a new `obj` (no primary key yet) of a model without parents: the same
    signals, values, INSERT … RETURNING and instance state as `Model.save()`. A backend that
    can't return the new id from the INSERT saves through the ORM."""
    model = type(obj)
    statement = _inserts.get(model)
    if statement is None:
        with _inserts_lock:
            statement = _inserts.setdefault(model, _Insert(model))
    statement.run(obj)


class _Insert:
    def __init__(self, model):
        meta = model._meta
        if meta.parents or meta.proxy or meta.auto_created or meta.order_with_respect_to:
            raise ValueError(f"{model}: only a plain model is inserted here.")
        self.model = model
        self.fields = [f for f in meta.local_concrete_fields if not f.generated]
        self.fields = [f for f in self.fields if f is not meta.auto_field]
        _check_placeholders(self.fields)
        self.returning = meta.db_returning_fields
        self._compiled = _PerConnection()

    def run(self, obj):
        if obj._is_pk_set() or not obj._state.adding:
            raise ValueError("Only a new instance, without a primary key, is inserted here.")
        obj._prepare_related_fields_for_save(operation_name="save")
        alias = router.db_for_write(self.model, instance=obj)
        connection = connections[alias]
        if not connection.features.can_return_columns_from_insert:
            return models.Model.save(obj)
        compiled = self._compiled.for_connection(connection, self._compile)
        pre_save.send(sender=self.model, instance=obj, raw=False, using=alias, update_fields=None)
        params = [_saved_value(f, f.pre_save(obj, add=True), connection) for f in self.fields]
        returning = compiled.returning_params
        rollback_on_error = transaction.mark_for_rollback_on_error(using=alias)
        with rollback_on_error, _cursor(connection) as cursor:
            cursor.execute(compiled.sql, [*params, *returning])
            rows = [connection.ops.fetch_returned_insert_columns(cursor, returning)]
        if compiled.converters:
            rows = list(compiled.compiler.apply_converters(rows, compiled.converters))
        for value, field in zip(rows[0], self.returning, strict=True):
            setattr(obj, field.attname, value)
        obj._state.db, obj._state.adding = alias, False
        post_save.send(
            sender=self.model, instance=obj, created=True, update_fields=None, raw=False,
            using=alias,
        )  # fmt: skip

    def _compile(self, connection):
        query = InsertQuery(self.model)
        blank = self.model()
        for field in self.fields:
            blank.__dict__[field.attname] = _Slot(field)
        query.insert_values(self.fields, [blank])
        compiler = query.get_compiler(connection=connection)
        assert isinstance(compiler, SQLInsertCompiler)
        compiler.returning_fields = self.returning
        [(sql, params)] = compiler.as_sql()
        slots = [i for i, p in enumerate(params) if isinstance(p, _Slot)]
        if slots != list(range(len(self.fields))):
            raise ValueError("The INSERT's values are not its first parameters, in order.")
        return _CompiledInsert(connection, compiler, sql, tuple(compiler.returning_params))


class _CompiledInsert:
    def __init__(self, connection, compiler, sql, returning_params):
        self.connection, self.compiler, self.sql = connection, compiler, sql
        self.returning_params = returning_params
        meta = compiler.query.get_meta()
        columns = [field.get_col(meta.db_table) for field in compiler.returning_fields]
        self.converters = compiler.get_converters(columns)
